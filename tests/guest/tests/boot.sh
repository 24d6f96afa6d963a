# boot: checks only that the guest reaches its test runner and sees its disks and NICs.
# Useful to time the boot and to debug the harness.
echo "disks: $(ls /sys/block | tr '\n' ' ')"
echo "nics: $(ls /sys/class/net | tr '\n' ' ')"

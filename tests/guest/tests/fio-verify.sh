# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# fio-verify: write a pattern to the virtio-blk disk with crc32c checksums, verify it while
# writing (do_verify), then verify the whole area again in a separate read-only pass.
# Parameters (kernel command line): ft.disk=vda ft.size=64M ft.bs=4k ft.iodepth=16
# ft.passes=write,verify (write = write + inline verify, verify = --verify_only re-read).

find_disk "${FT_DISK:-}"
echo "disk /dev/$disk: $(cat /sys/block/$disk/size) sectors, cache $(cat /sys/block/$disk/queue/write_cache 2>/dev/null)"

size=${FT_SIZE:-64M}
bs=${FT_BS:-4k}
iodepth=${FT_IODEPTH:-16}
passes=${FT_PASSES:-write,verify}

# Same job definition for both passes: fio regenerates the random offsets (randrepeat) and
# the expected data from it, so the verify-only pass checks every block written by pass one.
job() {
    fio --name=ftverify --filename="/dev/$disk" --rw=randwrite --bs="$bs" --size="$size" \
        --ioengine=libaio --iodepth="$iodepth" --direct=1 --verify=crc32c --verify_fatal=1 \
        --randrepeat=1 --group_reporting --eta=never "$@"
}

for pass in $(echo "$passes" | tr ',' ' '); do
    case "$pass" in
        write)
            stage fio-write-start
            job --do_verify=1 || fail "fio write+verify pass failed"
            stage fio-write-done
            ;;
        verify)
            stage fio-verify-start
            job --verify_only || fail "fio verify-only pass failed"
            stage fio-verify-done
            ;;
        *)
            fail "unknown pass $pass"
            ;;
    esac
done

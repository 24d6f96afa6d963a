// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Epoch cycle overhead with the sim checkpointer: cycles per second against fake daemons
//! (real ControlServer + TxQueue over unix sockets) and the seal / checkpoint / commit latency
//! breakdown. `cargo bench -p ft-common --bench coordinator_cycle [-- SECONDS]`.

#[path = "../tests/common/fake_device.rs"]
mod fake_device;

use fake_device::{FakeDevice, TestDevice};
use ft_common::control::message::DeviceKind;
use ft_common::coordinator::{
    CheckpointerSpec, Coordinator, CoordinatorConfig, CycleConfig, DeviceSpec, FailurePolicy,
    LinkConfig, Op,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Row {
    name: &'static str,
    ckpt: &'static str,
    traffic: bool,
}

fn run(row: &Row, secs: f64) -> serde_json::Value {
    let dir = std::env::temp_dir().join(format!("ft-coord-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let devs = [
        Arc::new(FakeDevice::start(
            "vda",
            dir.join("vda.ctl"),
            DeviceKind::Blk,
        )),
        Arc::new(FakeDevice::start(
            "net0",
            dir.join("net0.ctl"),
            DeviceKind::Net,
        )),
    ];
    let cfg = CoordinatorConfig {
        devices: devs
            .iter()
            .map(|d| DeviceSpec {
                name: d.name.clone(),
                socket: d.path.clone(),
            })
            .collect(),
        checkpointer: row.ckpt.parse::<CheckpointerSpec>().unwrap(),
        cycle: CycleConfig {
            // Cut as soon as the previous cut's synchronous part is done.
            interval: Some(Duration::ZERO),
            min_interval: None,
            checkpoint_timeout: Duration::from_secs(5),
            on_device_failure: FailurePolicy::StopVm,
            max_pending: 64,
        },
        link: LinkConfig {
            status_interval: Duration::from_secs(3600),
            ..LinkConfig::default()
        },
        state_file: dir.join("state"),
        api: None,
        metrics: None,
        claim: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = row.traffic.then(|| {
        let (devs, stop) = (devs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut tag = 0;
            while !stop.load(Ordering::Acquire) {
                for d in &devs {
                    d.submit(tag, 4096);
                }
                tag += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    });
    let c = Coordinator::start(cfg).unwrap();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    c.op(Op::Pause).unwrap();
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    if let Some(t) = traffic {
        t.join().unwrap();
    }
    let mut s = c.op(Op::Status).unwrap();
    s["elapsed_s"] = elapsed.into();
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    s
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    let rows = [
        Row {
            name: "idle, sim:0",
            ckpt: "sim",
            traffic: false,
        },
        Row {
            name: "idle, sim:2 (pipelined)",
            ckpt: "sim:2",
            traffic: false,
        },
        Row {
            name: "busy, sim:0",
            ckpt: "sim",
            traffic: true,
        },
    ];
    println!(
        "{:<24} {:>9} {:>15} {:>17} {:>15} {:>17}",
        "scenario (2 devices)",
        "cycles/s",
        "seal p50/p99",
        "ckpt p50/p99",
        "commit p50/p99",
        "seal->commit"
    );
    for row in &rows {
        let s = run(row, secs);
        let rate =
            s["cycle"]["epochs_committed"].as_f64().unwrap() / s["elapsed_s"].as_f64().unwrap();
        let l = &s["latency"];
        let pp = |k: &str| format!("{}/{} us", l[k]["p50_us"], l[k]["p99_us"]);
        println!(
            "{:<24} {:>9.0} {:>15} {:>17} {:>15} {:>17}",
            row.name,
            rate,
            pp("seal"),
            pp("checkpoint"),
            pp("commit"),
            pp("seal_to_commit")
        );
    }
}

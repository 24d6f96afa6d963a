// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device as ft-common's vhost-user server sees it.
//!
//! Holds what lives as long as the daemon (image, config space) and creates one [`BlkQueue`]
//! worker per queue. Invariant: the config space is the one of [`BlkConfig`], whose only
//! guest-writable field is `writeback`.

use crate::config::BlkConfig;
use crate::gate::hold::Hold;
use crate::image::Image;
use crate::queue::{BlkCounters, BlkQueue};
use ft_common::vhost_user::{DeviceError, VhostUserDevice};
use std::sync::Arc;
use std::time::Duration;

pub struct BlkDevice {
    image: Arc<Image>,
    config: Arc<BlkConfig>,
    queue_size: u16,
    counters: Arc<BlkCounters>,
    /// Output commit (`--ft hold`); None for the plain backend.
    hold: Option<Arc<Hold>>,
    /// Busy-polling window limit of each queue thread (zero: never poll).
    poll_max: Duration,
    /// Pause polling while the host has no idle CPU (ft-common's `poll.rs`).
    poll_cpu_guard: bool,
}

impl BlkDevice {
    pub fn new(image: Arc<Image>, config: Arc<BlkConfig>, queue_size: u16) -> BlkDevice {
        BlkDevice {
            image,
            config,
            queue_size,
            counters: Arc::default(),
            hold: None,
            poll_max: Duration::ZERO,
            poll_cpu_guard: true,
        }
    }

    /// Lets each queue thread busy-poll its ring and io_uring for up to `max` after a batch
    /// before sleeping (adaptive, see ft-common's worker); zero disables polling.
    pub fn with_polling(mut self, max: Duration) -> BlkDevice {
        self.poll_max = max;
        self
    }

    /// `false`: poll even while the host has no idle CPU (by default polling pauses then).
    pub fn with_poll_cpu_guard(mut self, on: bool) -> BlkDevice {
        self.poll_cpu_guard = on;
        self
    }

    /// Holds output requests in `hold` until the coordinator commits them (`--ft hold`).
    pub fn with_hold(mut self, hold: Arc<Hold>) -> BlkDevice {
        self.hold = Some(hold);
        self
    }

    /// Counters summed over all queues.
    pub fn counters(&self) -> &Arc<BlkCounters> {
        &self.counters
    }

    pub fn config(&self) -> &Arc<BlkConfig> {
        &self.config
    }
}

impl VhostUserDevice for BlkDevice {
    type Worker = BlkQueue;

    fn num_queues(&self) -> usize {
        usize::from(self.config.params().num_queues)
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.config.params().features()
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        self.config.read(offset, buf)
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        if self.config.write(offset, data) {
            Ok(())
        } else {
            Err(DeviceError::InvalidArgument(format!(
                "config write of {} bytes at {offset}: read-only field",
                data.len()
            )))
        }
    }

    fn create_worker(&self, _group: usize, queues: &[u16]) -> std::io::Result<BlkQueue> {
        let &[queue] = queues else {
            return Err(std::io::Error::other("virtio-blk: one queue per worker"));
        };
        // One slot per descriptor chain the ring can hold: the pool never runs dry.
        let q = BlkQueue::new(
            queue,
            self.image.clone(),
            self.config.clone(),
            u32::from(self.queue_size),
            self.counters.clone(),
            self.hold.clone(),
            self.poll_max,
        )
        .map_err(|e| std::io::Error::new(e.kind(), format!("queue {queue}: {e}")))?
        .with_poll_cpu_guard(self.poll_cpu_guard);
        Ok(q)
    }
}

//! The worker's one edge to the wire: the only module that builds or reads the generated
//! `venom_proto` messages. Everything else speaks the worker's own types and the shared
//! vocabulary of `venom-core` ([`AttemptRef`], [`AttemptOutcome`], [`ThrottlePolicy`],
//! [`Mode`]), whose wire forms come from [`venom_proto::convert`].
//!
//! Inbound, [`instructions`] reads a `CoordinatorMessage` (its assignments through
//! [`assignment`]). Outbound, [`Outgoing`] builds each `WorkerMessage`: a report (heartbeat,
//! start reports, results) or a registration (the node's [`Identity`], what it still runs and
//! the results nobody acknowledged), filled with results up to
//! [`MESSAGE_BUDGET_BYTES`].
//!
//! [`ThrottlePolicy`]: venom_core::mobius::ThrottlePolicy

use prost::Message as _;
use venom_core::mobius::Mode;
use venom_core::{AttemptOutcome, AttemptRef};
use venom_proto::convert::{from_task_finished, task_finished};
use venom_proto::v1 as pb;

use crate::agent::{Heartbeat, Identity, Instructions, Started};
use crate::executor::Assignment;
use crate::limits::MESSAGE_BUDGET_BYTES;
use crate::scan::HardwareProfile;

/// What one result costs a message beyond its own encoding: its field tag and length prefix,
/// rounded up.
const RESULT_FRAMING_BYTES: usize = 8;

/// What a coordinator message asks of this worker.
pub fn instructions(message: pb::CoordinatorMessage) -> Instructions {
    Instructions {
        registered: message.registered,
        slots_limit: message.slots_limit,
        ack: message.ack.into_iter().map(AttemptRef::from).collect(),
        assign: message.assign.into_iter().map(assignment).collect(),
        cancel: message.cancel.into_iter().map(AttemptRef::from).collect(),
        cluster_id: (message.cluster_id != 0).then_some(message.cluster_id),
        lease: message
            .lease
            .map(|grant| (grant.seq, std::time::Duration::from_millis(grant.lease_ms))),
    }
}

/// An assignment as the worker runs it. Without an attempt reference the attempt is all
/// zeros; a timeout of 0 is none; a mode of `UNSPECIFIED` (a coordinator that did not know)
/// is `None`; an empty `workdir` is none (a fresh directory per attempt).
pub fn assignment(assignment: pb::Assignment) -> Assignment {
    let mode = Mode::try_from(assignment.mode()).ok();
    Assignment {
        attempt: assignment.attempt.map(AttemptRef::from).unwrap_or_default(),
        wave_name: assignment.wave_name,
        task_id: assignment.task_id,
        index: assignment.index,
        shell: assignment.shell,
        argv: assignment.argv,
        env: assignment.env,
        timeout: (assignment.timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(assignment.timeout_ms)),
        cpus: assignment.cpus,
        traceparent: assignment.traceparent,
        mode,
        workdir: (!assignment.workdir.is_empty())
            .then(|| std::path::PathBuf::from(assignment.workdir)),
        memory_bytes: assignment.memory_bytes,
    }
}

/// One `WorkerMessage` being filled: a report or a registration, and results added to it
/// while they fit [`MESSAGE_BUDGET_BYTES`] (the first always does). Those that do not fit are
/// handed back, for a later message.
#[derive(Debug)]
pub struct Outgoing {
    message: pb::WorkerMessage,
    /// Bytes counted against the budget so far.
    size_bytes: usize,
}

impl Outgoing {
    /// A report: the heartbeat and the start reports, results to follow
    /// (`WorkerMessage.finished`). The budget counts the whole message.
    pub fn report(heartbeat: Option<Heartbeat>, started: Vec<Started>) -> Self {
        let message = pb::WorkerMessage {
            register: None,
            heartbeat: heartbeat.map(|heartbeat| heartbeat_message(&heartbeat)),
            started: started.into_iter().map(task_started).collect(),
            finished: Vec::new(),
            seq: 0,
        };
        let size_bytes = message.encoded_len();
        Self {
            message,
            size_bytes,
        }
    }

    /// A registration: who this node is and the attempts it still runs or has queued, results
    /// to follow (`Register.unacknowledged`). The budget counts the `Register`.
    pub fn registration(identity: &Identity, running: &[AttemptRef]) -> Self {
        let register = pb::Register {
            name: identity.name.to_string(),
            profile: Some(hardware_profile(&identity.profile)),
            slots: identity.slots,
            labels: identity.labels.clone(),
            throttle_policy: pb::ThrottlePolicy::from(identity.throttle_policy).into(),
            running: running.iter().copied().map(pb::AttemptRef::from).collect(),
            unacknowledged: Vec::new(),
            queue_depth: identity.queue_depth,
            cluster_id: 0,
        };
        let size_bytes = register.encoded_len();
        Self {
            message: pb::WorkerMessage {
                register: Some(register),
                ..pb::WorkerMessage::default()
            },
            size_bytes,
        }
    }

    /// Adds a result if it fits; otherwise hands it back, for a later message.
    #[must_use = "a result that does not fit must be kept for a later message"]
    pub fn add_result(
        &mut self,
        attempt: AttemptRef,
        outcome: AttemptOutcome,
    ) -> Option<(AttemptRef, AttemptOutcome)> {
        let result = task_finished(attempt, outcome);
        let result_bytes = result.encoded_len() + RESULT_FRAMING_BYTES;
        let results = match &mut self.message.register {
            Some(register) => &mut register.unacknowledged,
            None => &mut self.message.finished,
        };
        if !results.is_empty() && self.size_bytes + result_bytes > MESSAGE_BUDGET_BYTES {
            // Back to the shared form, losslessly: the result carries its attempt.
            let outcome = from_task_finished(result)
                .map(|(_, outcome)| outcome)
                .unwrap_or_default();
            return Some((attempt, outcome));
        }
        self.size_bytes += result_bytes;
        results.push(result);
        None
    }

    /// The message.
    pub fn into_message(self) -> pb::WorkerMessage {
        self.message
    }
}

fn task_started(started: Started) -> pb::TaskStarted {
    pb::TaskStarted {
        attempt: Some(started.attempt.into()),
        started_ms: started.started_ms,
        pid: started.pid,
    }
}

fn heartbeat_message(heartbeat: &Heartbeat) -> pb::Heartbeat {
    let snapshot = &heartbeat.theta;
    pb::Heartbeat {
        theta: snapshot.theta,
        h_cpu: snapshot.h_cpu,
        h_mem: snapshot.h_mem,
        h_term: snapshot.h_term,
        running: heartbeat.running,
        memory_available_bytes: snapshot.memory_available_bytes,
        cpu_usage_percent: snapshot.cpu_usage_percent,
    }
}

/// The wire form of the hardware profile, sent in `Register` (a critical temperature that is
/// not reported travels as 0).
pub fn hardware_profile(profile: &HardwareProfile) -> pb::HardwareProfile {
    pb::HardwareProfile {
        cpu_physical_cores: profile.cpu_physical_cores,
        cpu_logical_cores: profile.cpu_logical_cores,
        cpu_arch: profile.cpu_arch.clone(),
        cpu_vendor: profile.cpu_vendor.clone(),
        cpu_brand: profile.cpu_brand.clone(),
        cpu_frequency_mhz: profile.cpu_frequency_mhz,
        cpu_usage_percent: profile.cpu_usage_percent,
        memory_total_bytes: profile.memory_total_bytes,
        memory_available_bytes: profile.memory_available_bytes,
        swap_total_bytes: profile.swap_total_bytes,
        swap_free_bytes: profile.swap_free_bytes,
        gpus: profile
            .gpus
            .iter()
            .map(|gpu| pb::GpuInfo {
                backend: gpu.backend.clone(),
                name: gpu.name.clone(),
                memory_total_bytes: gpu.memory_total_bytes,
                index: gpu.index,
            })
            .collect(),
        thermal_sensors: profile
            .thermal_sensors
            .iter()
            .map(|sensor| pb::ThermalSensor {
                label: sensor.label.clone(),
                celsius: sensor.celsius,
                critical_celsius: sensor.critical_celsius.unwrap_or(0.0),
            })
            .collect(),
        has_thermal_sensor: profile.has_thermal_sensor,
        os_name: profile.os_name.clone(),
        os_version: profile.os_version.clone(),
        kernel_version: profile.kernel_version.clone(),
        hostname: profile.hostname.clone(),
        hyperthreading: profile.hyperthreading,
        virtualization: profile.virtualization.clone(),
        in_docker: profile.in_docker,
        in_kubernetes: profile.in_kubernetes,
        cgroup_cpu_quota: profile.cgroup_cpu_quota,
        cgroup_memory_limit_bytes: profile.cgroup_memory_limit_bytes,
        effective_cpus: profile.effective_cpus,
        effective_memory_bytes: profile.effective_memory_bytes,
        opencl_icds: profile.opencl_icds.clone(),
        metal: profile.metal,
    }
}

/// The profile a `Register` carries, as the worker holds it (a critical temperature of 0
/// means "not reported"). Only the tests read profiles back.
#[cfg(test)]
pub(crate) fn hardware_profile_from_wire(profile: &pb::HardwareProfile) -> HardwareProfile {
    HardwareProfile {
        cpu_physical_cores: profile.cpu_physical_cores,
        cpu_logical_cores: profile.cpu_logical_cores,
        cpu_arch: profile.cpu_arch.clone(),
        cpu_vendor: profile.cpu_vendor.clone(),
        cpu_brand: profile.cpu_brand.clone(),
        cpu_frequency_mhz: profile.cpu_frequency_mhz,
        cpu_usage_percent: profile.cpu_usage_percent,
        memory_total_bytes: profile.memory_total_bytes,
        memory_available_bytes: profile.memory_available_bytes,
        swap_total_bytes: profile.swap_total_bytes,
        swap_free_bytes: profile.swap_free_bytes,
        gpus: profile
            .gpus
            .iter()
            .map(|gpu| crate::scan::GpuInfo {
                backend: gpu.backend.clone(),
                name: gpu.name.clone(),
                memory_total_bytes: gpu.memory_total_bytes,
                index: gpu.index,
            })
            .collect(),
        thermal_sensors: profile
            .thermal_sensors
            .iter()
            .map(|sensor| crate::scan::ThermalSensor {
                label: sensor.label.clone(),
                celsius: sensor.celsius,
                critical_celsius: (sensor.critical_celsius > 0.0)
                    .then_some(sensor.critical_celsius),
            })
            .collect(),
        has_thermal_sensor: profile.has_thermal_sensor,
        os_name: profile.os_name.clone(),
        os_version: profile.os_version.clone(),
        kernel_version: profile.kernel_version.clone(),
        hostname: profile.hostname.clone(),
        hyperthreading: profile.hyperthreading,
        virtualization: profile.virtualization.clone(),
        in_docker: profile.in_docker,
        in_kubernetes: profile.in_kubernetes,
        cgroup_cpu_quota: profile.cgroup_cpu_quota,
        cgroup_memory_limit_bytes: profile.cgroup_memory_limit_bytes,
        effective_cpus: profile.effective_cpus,
        effective_memory_bytes: profile.effective_memory_bytes,
        opencl_icds: profile.opencl_icds.clone(),
        metal: profile.metal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_reads_as_the_worker_runs_it_and_its_result_names_it() {
        let wire = pb::Assignment {
            attempt: Some(pb::AttemptRef {
                wave_id: 7,
                micro: 3,
                attempt: 2,
            }),
            task_id: "shard".to_owned(),
            index: Some(3),
            shell: "true".to_owned(),
            timeout_ms: 0,
            mode: pb::ThetaMode::Optimize.into(),
            ..Default::default()
        };
        let read = assignment(wire.clone());
        assert_eq!(read.attempt, AttemptRef::new((7, 3), 2));
        assert_eq!(read.timeout, None);
        assert_eq!(read.workdir, None, "no workdir: a fresh directory");
        assert_eq!(read.memory_bytes, 0);
        let with_place = assignment(pb::Assignment {
            workdir: "/srv/data".to_owned(),
            memory_bytes: 1 << 30,
            ..wire.clone()
        });
        assert_eq!(
            with_place.workdir,
            Some(std::path::PathBuf::from("/srv/data"))
        );
        assert_eq!(with_place.memory_bytes, 1 << 30);
        assert_eq!(read.mode.map(Mode::as_str), Some("OPTIMIZE"));
        let unspecified = assignment(pb::Assignment {
            mode: pb::ThetaMode::Unspecified.into(),
            timeout_ms: 250,
            ..wire.clone()
        });
        assert_eq!(
            unspecified.mode, None,
            "a mode the coordinator did not know"
        );
        assert_eq!(
            unspecified.timeout,
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(
            assignment(pb::Assignment {
                attempt: None,
                ..wire.clone()
            })
            .attempt,
            AttemptRef::default()
        );

        let mut report = Outgoing::report(None, Vec::new());
        assert!(
            report
                .add_result(read.attempt, AttemptOutcome::default())
                .is_none(),
            "the first result always fits"
        );
        assert_eq!(
            report.into_message().finished[0].attempt,
            Some(pb::AttemptRef {
                wave_id: 7,
                micro: 3,
                attempt: 2
            })
        );
    }
}

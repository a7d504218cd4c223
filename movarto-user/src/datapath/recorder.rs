//! The recording of the frames sent into a VM's tap (`movarto_common::recorder`), for
//! the length of a migration at its source. Not pinned: it goes with the agent that
//! loaded it, so a crashed agent leaves no program behind on the tap.

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::{SchedClassifier, TcAttachType, tc},
};
use movarto_common::recorder::{FRAMES_PER_CPU, RecordedFrame};

/// The recorder's object (`movarto-ebpf/src/bin/recorder.rs`).
static RECORDER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/movarto-recorder"));
const RECORDER_PROGRAM: &str = "record_to_vm";
const RECENT_FRAMES_MAP: &str = "RECENT_FRAMES";

/// The recording on one tap, attached to its TC egress (what goes to the VM) while
/// this lives.
pub struct TapRecorder {
    ebpf: Ebpf,
    tap: String,
}

impl TapRecorder {
    pub fn start(tap: &str) -> Result<Self> {
        let cpus = aya::util::nr_cpus().map_err(|(what, err)| anyhow!("{what}: {err}"))?;
        let slots = u32::try_from(cpus)
            .ok()
            .and_then(|cpus| cpus.checked_mul(FRAMES_PER_CPU))
            .context("too many CPUs for the recording")?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(RECENT_FRAMES_MAP, slots)
            .load(RECORDER_OBJECT)
            .context("loading the tap's recorder")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(RECORDER_PROGRAM)
            .context("the recorder's program")?
            .try_into()
            .context("the recorder's program type")?;
        program.load().context("loading the recorder's program")?;
        // clsact is only needed without TCX (kernels before 6.6); it may exist already.
        let _ = tc::qdisc_add_clsact(tap);
        program
            .attach(tap, TcAttachType::Egress)
            .with_context(|| format!("attaching the recorder to {tap}'s egress"))?;
        Ok(Self {
            ebpf,
            tap: tap.to_owned(),
        })
    }

    /// The frames recorded so far, oldest first (by the time each entered the tap).
    pub fn frames(&self) -> Result<Vec<RecordedFrame>> {
        let map = self
            .ebpf
            .map(RECENT_FRAMES_MAP)
            .context("the recorder's map")?;
        let slots: Array<&MapData, RecordedFrame> =
            Array::try_from(map).context("the recorder's map type")?;
        let mut frames = Vec::new();
        for slot in slots.iter() {
            let slot = slot.with_context(|| format!("reading {}'s recording", self.tap))?;
            if slot.ktime_ns != 0 {
                frames.push(slot);
            }
        }
        frames.sort_by_key(|f| f.ktime_ns);
        Ok(frames)
    }
}

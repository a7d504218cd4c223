//! What the two flow maps (confirmed and pending; see `movarto_common::flow`)
//! share in userspace: reading both as one, and which one a flow belongs in.

use std::{borrow::Borrow, collections::HashSet};

use anyhow::{Result, anyhow};
use aya::maps::{HashMap, MapData};
use movarto_common::flow::{FlowKey, FlowValue};

use super::{FLOWS_MAP, PENDING_FLOWS_MAP};

/// The map a flow in this state belongs in.
pub fn map_for(value: &FlowValue) -> &'static str {
    if value.is_confirmed() {
        FLOWS_MAP
    } else {
        PENDING_FLOWS_MAP
    }
}

/// Flows read from the maps, each key once: iterating a hash map that changes
/// meanwhile can restart and return a key twice, and a flow confirmed during the
/// read can show up in both maps (the confirmed map is read first and wins).
#[derive(Default)]
pub struct Collected {
    seen: HashSet<FlowKey>,
    flows: Vec<(FlowKey, FlowValue)>,
}

impl Collected {
    /// Adds every flow of `map` not seen yet; returns how many that was.
    pub fn add<T: Borrow<MapData>>(&mut self, map: &HashMap<T, FlowKey, FlowValue>) -> Result<u64> {
        let mut added = 0;
        for entry in map.iter() {
            let (key, value) = entry.map_err(|e| anyhow!("reading a flow map: {e}"))?;
            if self.seen.insert(key) {
                self.flows.push((key, value));
                added += 1;
            }
        }
        Ok(added)
    }

    pub fn into_vec(self) -> Vec<(FlowKey, FlowValue)> {
        self.flows
    }
}

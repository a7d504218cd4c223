//! The verifier's instruction budget per program, checked in beside the eBPF sources
//! (`movarto-ebpf/verifier-budget.toml`): growth past it by more than
//! [`ALLOWED_GROWTH_PERCENT`] fails CI, so a change that makes verification much more
//! expensive is noticed and explained, long before the kernel's limit.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

/// The budget file, as built into this binary.
const BUDGET_TOML: &str = include_str!("../../../movarto-ebpf/verifier-budget.toml");

/// How far past its budget a program may grow before CI fails.
pub const ALLOWED_GROWTH_PERCENT: u64 = 10;

/// Each program's budget, by name.
pub fn verifier_budget() -> Result<BTreeMap<String, u32>> {
    toml::from_str(BUDGET_TOML).context("parsing movarto-ebpf/verifier-budget.toml")
}

/// Why `verified` instructions are over `budget` by more than the allowed growth, if they are.
pub fn over_budget(program: &str, verified: u32, budget: u32) -> Option<String> {
    let limit = u64::from(budget) * (100 + ALLOWED_GROWTH_PERCENT) / 100;
    (u64::from(verified) > limit).then(|| {
        format!(
            "{program}: the verifier walked {verified} instructions, more than \
             {ALLOWED_GROWTH_PERCENT} % over its budget of {budget}; if the change needs it, \
             raise the budget in movarto-ebpf/verifier-budget.toml and say why in the commit"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{UPLINK_INGRESS, VM_INGRESS};

    #[test]
    fn every_program_has_a_budget() {
        let budget = verifier_budget().expect("valid");
        for program in [UPLINK_INGRESS, VM_INGRESS] {
            assert!(budget.get(program).is_some_and(|n| *n > 0), "{program}");
        }
    }

    #[test]
    fn growth_up_to_ten_percent_is_allowed() {
        assert_eq!(over_budget("p", 1100, 1000), None);
        assert_eq!(over_budget("p", 900, 1000), None);
        let over = over_budget("p", 1101, 1000).expect("over");
        assert!(over.contains("raise the budget"), "{over}");
    }
}

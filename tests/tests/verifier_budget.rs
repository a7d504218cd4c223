//! A regression check that is not a timing: the verifier's instruction count per
//! program stays within 10 % of the budget checked in at
//! `movarto-ebpf/verifier-budget.toml`. Root only.

use movarto_tests::require_root;
use movarto_user::datapath::{
    Datapath,
    budget::{over_budget, verifier_budget},
};

#[test]
fn every_program_verifies_within_its_instruction_budget() {
    require_root();
    let datapath = Datapath::load().expect("load datapath");
    let budget = verifier_budget().expect("the budget file");
    let infos = datapath.program_infos().expect("program infos");
    assert_eq!(
        infos.len(),
        budget.len(),
        "every program has a budget and every budget a program: {:?} vs {budget:?}",
        infos.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    let mut over = Vec::new();
    for (name, info) in &infos {
        let verified = info.verified_instruction_count().unwrap_or_else(|| {
            panic!("the kernel reports no verified instruction count for {name}")
        });
        let limit = *budget
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no budget in movarto-ebpf/verifier-budget.toml"));
        eprintln!("{name}: {verified} instructions verified, budget {limit}");
        over.extend(over_budget(name, verified, limit));
    }
    assert!(over.is_empty(), "{}", over.join("\n"));
}

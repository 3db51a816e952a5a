#![allow(clippy::unwrap_used)]

use super::*;

fn assignment() -> Assignment {
    Assignment {
        job_id: "j".into(),
        rank: 1,
        peers: vec!["a:1".into(), "b:2".into()],
        ring_rank: 1,
        elastic: false,
        generation: 0,
        joining: false,
        job_toml: "[job]".into(),
        job_path: "/x/job.toml".into(),
        data_path: None,
        fingerprint: "f".into(),
        writer_rank: 0,
        out_dir: Some("/out".into()),
        resume_from: None,
        checkpoint_every: Some(2),
        heartbeat_interval: Duration::from_millis(250),
        collective_timeout: Duration::from_secs(5),
        group: None,
    }
}

#[test]
fn assignment_round_trips_and_ranks_are_checked() {
    let a = assignment();
    assert_eq!(Assignment::try_from(wire::Assignment::from(a.clone())).unwrap(), a);
    let mut w = wire::Assignment::from(a.clone());
    w.ring_rank = 2;
    let e = Assignment::try_from(w).unwrap_err();
    assert_eq!(e.field, "ring_rank");
    // Without elasticity the job-wide number is the ring rank.
    let mut w = wire::Assignment::from(a.clone());
    w.rank = 3;
    assert_eq!(Assignment::try_from(w).unwrap_err().field, "ring_rank");
    // A worker that joined an elastic job keeps its number; its place in the ring differs.
    let mut joined = a;
    (joined.elastic, joined.rank, joined.generation, joined.joining) = (true, 4, 2, true);
    assert_eq!(
        Assignment::try_from(wire::Assignment::from(joined.clone())).unwrap(),
        joined
    );
}

#[test]
fn a_reform_round_trips_and_its_ranks_are_checked() {
    let r = Command::Reform(Reform {
        generation: 3,
        ring_rank: 1,
        peers: vec!["a:1".into(), "c:3".into()],
        writer_rank: 0,
        reason: "worker rank 1 left".into(),
    });
    assert_eq!(Command::try_from(wire::Command::from(r.clone())).unwrap(), r);
    let mut w = wire::Command::from(r);
    if let Some(reform) = w.reform.as_mut() {
        reform.ring_rank = 2;
    }
    assert_eq!(Command::try_from(w).unwrap_err().field, "ring_rank");
}

#[test]
fn a_fold_group_round_trips_and_must_contain_this_worker() {
    let mut a = assignment();
    a.group = Some(FoldGroup {
        index: 1,
        count: 2,
        rank: 0,
        peers: vec!["b:2".into()],
        folds: vec![1, 3],
        ring_id: "j.group1".into(),
    });
    assert_eq!(Assignment::try_from(wire::Assignment::from(a.clone())).unwrap(), a);
    let mut w = wire::Assignment::from(a);
    if let Some(g) = w.group.as_mut() {
        g.peers = vec!["a:1".into()];
    }
    assert_eq!(Assignment::try_from(w.clone()).unwrap_err().field, "peers");
    if let Some(g) = w.group.as_mut() {
        g.peers = vec!["b:2".into()];
        g.folds.clear();
    }
    assert_eq!(Assignment::try_from(w).unwrap_err().field, "folds");
}

#[test]
fn finish_report_needs_an_outcome() {
    let w = wire::FinishReport {
        job_id: "j".into(),
        rank: 0,
        outcome: None,
    };
    assert_eq!(FinishReport::try_from(w).unwrap_err().field, "outcome");
    let ok = FinishReport {
        job_id: "j".into(),
        rank: 0,
        outcome: WorkerOutcome::Finished {
            params_checksum: 7,
            summary_json: "{}".into(),
            comm_secs: 0.5,
            steps: 3,
            metrics_jsonl: String::new(),
        },
    };
    assert_eq!(
        FinishReport::try_from(wire::FinishReport::from(ok.clone())).unwrap(),
        ok
    );
}

//! Three managers in one process over real mTLS QUIC on loopback.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use starling_raft_store::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_election_and_forwarded_write() {
    let c = TestCluster::start(3, 5_000).await;
    let leader = c.leader_id(T).await;
    let status = c.m(leader).store.status();
    assert_eq!(status.voters.len(), 3);
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    // A write on a follower is forwarded to the leader.
    let r = c.m(follower).store.write(put("k", "v1")).await.unwrap();
    assert!(matches!(r.outcome, Outcome::Put { prev: None }));
    c.wait_applied(r.revision, T).await;
    for m in c.running() {
        let (v, rev) = get(&m.store, "k", Consistency::Stale).await;
        assert_eq!(v.as_deref(), Some(&b"v1"[..]));
        assert!(rev >= r.revision);
    }
    // Linearizable read on a follower sees it too.
    let (v, _) = get(&c.m(follower).store, "k", Consistency::Linearizable).await;
    assert_eq!(v.as_deref(), Some(&b"v1"[..]));
    // CAS through a follower: revision-checked, and a stale expectation fails.
    let ok = c
        .m(follower)
        .store
        .write(Command::cas_revision("k", r.revision, b"v2".to_vec()))
        .await
        .unwrap();
    assert_eq!(ok.outcome, Outcome::Txn { succeeded: true });
    let stale = c
        .m(follower)
        .store
        .write(Command::cas_revision("k", r.revision, b"v3".to_vec()))
        .await
        .unwrap();
    assert_eq!(stale.outcome, Outcome::Txn { succeeded: false });
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_leader_stopped_new_leader_old_rejoins_as_follower() {
    let mut c = TestCluster::start(3, 5_000).await;
    let old = c.leader_id(T).await;
    let r1 = c.m(old).store.write(put("a", "1")).await.unwrap();
    c.wait_applied(r1.revision, T).await;
    let stopped_at = Instant::now();
    c.stop(old).await;
    let new = c.wait_leader(T).await;
    assert_ne!(new, old);
    let r2 = c.m(new).store.write(put("a", "2")).await.unwrap();
    eprintln!(
        "leader stop -> first write acknowledged: {:?}",
        stopped_at.elapsed()
    );
    // A linearizable read after the leader change never returns the old value.
    for m in c.running() {
        let (v, _) = get(&m.store, "a", Consistency::Linearizable).await;
        assert_eq!(v.as_deref(), Some(&b"2"[..]));
    }
    c.restart(old).await;
    c.wait_applied(r2.revision, T).await;
    let leader = c.wait_leader(T).await;
    let status = c.m(old).store.status();
    assert!(!status.is_leader || leader == old);
    assert_eq!(status.leader, Some(leader));
    let (v, _) = get(&c.m(old).store, "a", Consistency::Stale).await;
    assert_eq!(v.as_deref(), Some(&b"2"[..]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_all_stopped_and_reopened_keep_state_and_revision() {
    let mut c = TestCluster::start(3, 5_000).await;
    let mut last = 0;
    for i in 0..50 {
        let r = c
            .m(1)
            .store
            .write(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap();
        last = r.revision;
    }
    c.wait_applied(last, T).await;
    let before: Vec<_> = c
        .running()
        .map(|m| {
            let st = m.store.status();
            (st.id, st.applied)
        })
        .collect();
    for id in 1..=3 {
        c.stop(id).await;
    }
    for id in 1..=3 {
        c.restart(id).await;
    }
    c.wait_leader(T).await;
    c.wait_applied(last, T).await;
    for m in c.running() {
        let (v, rev) = get(&m.store, "k49", Consistency::Stale).await;
        assert_eq!(v.as_deref(), Some(&b"v49"[..]));
        assert!(rev >= last);
        let n = m
            .store
            .read(Consistency::Stale, |s| s.range("k").len())
            .await
            .unwrap()
            .0;
        assert_eq!(n, 50);
    }
    assert_eq!(before.len(), 3);
    // And it goes on taking writes.
    c.m(2).store.write(put("after", "restart")).await.unwrap();
    // A command over the limit is refused before it reaches the log.
    let huge = Command::Put {
        key: "huge".into(),
        value: vec![0; MAX_COMMAND_BYTES + 1],
    };
    let err = c.m(2).store.write(huge).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t23_new_manager_catches_up_by_snapshot_after_20000_writes() {
    let mut c = TestCluster::start(3, 2_000).await;
    let leader = c.leader_id(T).await;
    let mut tasks = Vec::new();
    let writers = 64;
    let per = 20_000 / writers;
    let started = Instant::now();
    for w in 0..writers {
        let store = &c.m(leader).store;
        tasks.push(async move {
            let mut last = 0;
            for i in 0..per {
                let r = store
                    .write(put(&format!("w{w:02}/{i:04}"), "0123456789abcdef"))
                    .await
                    .unwrap();
                last = r.revision;
            }
            last
        });
    }
    let last = futures::future::join_all(tasks)
        .await
        .into_iter()
        .max()
        .unwrap();
    eprintln!(
        "20 000 writes with {writers} writers in {:?}",
        started.elapsed()
    );
    c.wait_applied(last, T).await;
    c.m(leader).store.snapshot().await.unwrap();

    c.add_manager_process(4).await;
    // A watcher on the new manager from the start: the snapshot that catches it up skips
    // history, which the watch must report rather than silently jump over.
    let mut early = c.m(4).store.watch("w", 0).unwrap();
    c.join(4).await;
    let err = tokio::time::timeout(T, early.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, StoreError::Compacted { .. }), "{err}");
    let m4 = c.m(4);
    // The leader's `promote` returns once the change is committed there; m4 learns it with
    // the next append or heartbeat.
    let deadline = std::time::Instant::now() + T;
    loop {
        let status = m4.store.status();
        if status.voters.contains(&4) && status.applied >= last {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "m4 not a voter with {last} applied: {status:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let n = m4
        .store
        .read(Consistency::Stale, |s| s.range("w").len())
        .await
        .unwrap()
        .0;
    assert_eq!(n, writers * per);
    // It was caught up by a snapshot: the log before the snapshot was purged on the leader,
    // and the new manager holds a snapshot file.
    assert!(c.data_dir(4).join("state/snapshot.bin").exists());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t24_two_of_three_stopped_writes_fail_with_no_quorum_stale_reads_answer() {
    let mut c = TestCluster::start(3, 5_000).await;
    let r = c.m(1).store.write(put("q", "before")).await.unwrap();
    c.wait_applied(r.revision, T).await;
    let leader = c.leader_id(T).await;
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    for id in (1..=3).filter(|i| *i != survivor) {
        c.stop(id).await;
    }
    let store = &c.m(survivor).store;
    // The bound the store promises, plus a little for the test's own scheduling.
    let bound = c.config(survivor).quorum_deadline() + Duration::from_millis(250);
    let started = Instant::now();
    let err = store.write(put("q", "after")).await.unwrap_err();
    let took = started.elapsed();
    match err {
        StoreError::NoQuorum {
            reachable,
            voters,
            needed,
            ..
        } => {
            assert_eq!((reachable, voters, needed), (1, 3, 2));
        }
        other => panic!("expected NoQuorum, got {other}"),
    }
    assert!(took <= bound, "took {took:?}, bound {bound:?}");
    let started = Instant::now();
    let err = store
        .read(Consistency::Linearizable, |s| s.revision())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoQuorum { .. }), "{err}");
    assert!(started.elapsed() <= bound, "took {:?}", started.elapsed());
    let (v, rev) = get(store, "q", Consistency::Stale).await;
    assert_eq!(v.as_deref(), Some(&b"before"[..]));
    assert!(rev >= r.revision);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t25_watch_resumes_without_gap_or_duplicate() {
    let c = TestCluster::start(3, 5_000).await;
    let s = &c.m(1).store;
    let first = s.write(put("w/a", "1")).await.unwrap().revision;
    s.write(put("other", "x")).await.unwrap();
    s.write(put("w/b", "2")).await.unwrap();
    c.wait_applied(first + 2, T).await;
    let follower = &c.m(2).store;
    let mut watch = follower.watch("w/", first).unwrap();
    let live = tokio::spawn({
        async move {
            let mut seen = Vec::new();
            while seen.len() < 4 {
                let e = tokio::time::timeout(T, watch.next())
                    .await
                    .unwrap()
                    .unwrap();
                seen.push((e.revision, e.key.clone()));
            }
            seen
        }
    });
    s.write(put("w/c", "3")).await.unwrap();
    s.write(Command::Delete { key: "w/a".into() })
        .await
        .unwrap();
    let seen = live.await.unwrap();
    let keys: Vec<&str> = seen.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(keys, vec!["w/a", "w/b", "w/c", "w/a"]);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t26_leader_transfer_demote_and_remove() {
    let c = TestCluster::start(3, 5_000).await;
    let leader = c.leader_id(T).await;
    let target = (1..=3).find(|i| *i != leader).unwrap();
    c.m(leader).store.transfer_leader(target).await.unwrap();
    let deadline = Instant::now() + T;
    while c.leader_id(T).await != target {
        assert!(
            Instant::now() < deadline,
            "leadership did not move to m{target}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c
        .m(leader)
        .store
        .write(put("after-transfer", "ok"))
        .await
        .unwrap();
    c.wait_applied(r.revision, T).await;

    // Demote the old leader to learner: the voter set shrinks, it still replicates.
    let l = &c.m(target).store;
    l.demote(leader).await.unwrap();
    let s = l.status();
    assert!(
        !s.voters.contains(&leader) && s.learners.contains(&leader),
        "{s:?}"
    );
    let r = l.write(put("after-demote", "ok")).await.unwrap();
    c.wait_applied(r.revision, T).await;

    // Remove it entirely.
    l.remove(leader).await.unwrap();
    let s = l.status();
    assert!(
        !s.voters.contains(&leader) && !s.learners.contains(&leader),
        "{s:?}"
    );
    assert_eq!(s.voters.len(), 2);
    l.write(put("after-remove", "ok")).await.unwrap();
    // Membership changes run on the leader only.
    let follower = (1..=3).find(|i| *i != target && *i != leader).unwrap();
    let err = c.m(follower).store.demote(target).await.unwrap_err();
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t27_force_new_cluster_from_the_last_manager_keeps_every_write() {
    // A small snapshot interval: the survivor holds a snapshot and a log after it.
    let mut c = TestCluster::start(3, 50).await;
    let mut last = 0;
    for i in 0..120 {
        last = c
            .m(1)
            .store
            .write(put(&format!("k{i}"), &format!("v{i}")))
            .await
            .unwrap()
            .revision;
    }
    c.wait_applied(last, T).await;
    let leader = c.leader_id(T).await;
    let survivor = (1..=3).find(|i| *i != leader).unwrap();
    // The other two are lost for good.
    for id in (1..=3).filter(|i| *i != survivor) {
        c.stop(id).await;
        std::fs::remove_dir_all(c.data_dir(id)).unwrap();
    }
    c.stop(survivor).await;
    // The stopped store's log writer lets go of the directory's lock a moment after
    // shutdown returns (its thread ends on its own): only that is waited for.
    let deadline = Instant::now() + T;
    let recovered = loop {
        match starling_raft_store::force_new_cluster(
            &c.data_dir(survivor),
            survivor,
            c.node(survivor),
        )
        .await
        {
            Err(e) if e.to_string().contains("is locked by another open log") => {
                assert!(Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert!(recovered.last_index >= last, "{recovered:?}");
    assert_eq!(
        recovered.former_voters.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    c.restart(survivor).await;
    let store = &c.m(survivor).store;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.status().is_leader {
        assert!(Instant::now() < deadline, "the survivor did not lead alone");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.status().voters.into_iter().collect::<Vec<_>>(),
        vec![survivor]
    );
    // Every write of before, and writes go on.
    for i in 0..120 {
        let (v, _) = get(store, &format!("k{i}"), Consistency::Linearizable).await;
        assert_eq!(v, Some(format!("v{i}").into_bytes()), "k{i}");
    }
    let r = store.write(put("after", "1")).await.unwrap();
    assert!(r.revision > last);
    // A recovered store opens again as it is (the recovery is not needed twice).
    c.stop(survivor).await;
    c.restart(survivor).await;
    let store = &c.m(survivor).store;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.status().is_leader {
        assert!(
            Instant::now() < deadline,
            "the survivor did not lead after a restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (v, _) = get(store, "after", Consistency::Linearizable).await;
    assert_eq!(v.as_deref(), Some(&b"1"[..]));
    // A directory with nothing in it is refused.
    let empty = tempfile::tempdir().unwrap();
    let err = starling_raft_store::force_new_cluster(empty.path(), 1, c.node(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing to recover"), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t28_a_watcher_that_falls_behind_the_live_buffer_catches_up_from_history() {
    // Eight changes buffered: the watcher below falls far behind twice.
    let c = TestCluster::start_with(1, 5_000, 8).await;
    let s = &c.m(1).store;
    let mut watch = s.watch("l/", 0).unwrap();
    // A transaction: three changes of one revision.
    let txn = Command::Txn {
        compares: vec![],
        success: ["l/t1", "l/t2", "l/t3"]
            .iter()
            .map(|k| TxnOp::Put {
                key: (*k).into(),
                value: b"t".to_vec(),
            })
            .collect(),
        failure: vec![],
    };
    let txn_rev = s.write(txn).await.unwrap().revision;
    let first = watch.next().await.unwrap();
    assert_eq!((first.revision, first.key.as_str()), (txn_rev, "l/t1"));
    // Fifty more while the watcher reads nothing: the live buffer overflows mid-transaction.
    for i in 0..50 {
        s.write(put(&format!("l/{i:02}"), "v")).await.unwrap();
        s.write(put("other", "x")).await.unwrap();
    }
    let mut keys = vec![first.key.clone()];
    let mut revisions = vec![first.revision];
    while keys.len() < 53 {
        let e = tokio::time::timeout(T, watch.next())
            .await
            .unwrap()
            .unwrap();
        keys.push(e.key.clone());
        revisions.push(e.revision);
    }
    let mut want = vec!["l/t1".to_owned(), "l/t2".into(), "l/t3".into()];
    want.extend((0..50).map(|i| format!("l/{i:02}")));
    assert_eq!(keys, want, "no gap, no duplicate");
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]));
    // And live again afterwards.
    let r = s.write(put("l/after", "1")).await.unwrap().revision;
    let e = tokio::time::timeout(T, watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((e.revision, e.key.as_str()), (r, "l/after"));
    c.shutdown().await;
}

/// Linearizable reads share leader calls (one per batch of the reads that arrived during
/// the last call), and each still sees every write acknowledged before it began: 32
/// concurrent loops each write their own key through the leader and read it back through a
/// follower, 40 times; a read that misses the write acknowledged just before it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t29_batched_linearizable_reads_see_every_write_acknowledged_before_them() {
    let c = TestCluster::start(3, 5_000).await;
    let leader = c.leader_id(T).await;
    let followers: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let loops = (0..32u64).map(|t| {
        // Written through the leader (acknowledged once the leader applied it), read through
        // a follower, which may not have applied it yet: only a read index asked after the
        // write finds it.
        let writer = &c.m(leader).store;
        let reader = &c.m(followers[(t % 2) as usize]).store;
        async move {
            let key = format!("t{t:02}");
            for i in 0..40u64 {
                let value = format!("{i}");
                let w = writer.write(put(&key, &value)).await.unwrap();
                let (seen, rev) = reader
                    .read(Consistency::Linearizable, |s| {
                        s.get(&key).map(|e| e.value.to_vec())
                    })
                    .await
                    .unwrap();
                assert!(
                    rev >= w.revision,
                    "read at {rev} after a write at {}",
                    w.revision
                );
                assert_eq!(
                    seen.as_deref(),
                    Some(value.as_bytes()),
                    "loop {t}, write {i}"
                );
            }
        }
    });
    futures::future::join_all(loops).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2a_concurrent_writes_on_a_follower_go_to_the_leader_together_each_with_its_outcome() {
    let c = TestCluster::start(3, 5_000).await;
    let leader = c.leader_id(T).await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let store = &c.m(follower).store;
    let first = store.write(put("base", "0")).await.unwrap();
    let before = store.forwarded();
    // 48 writers of their own keys beside 16 compare-and-sets that must fail, all at once:
    // every write keeps its own outcome inside a batch.
    let puts = (0..48u64).map(|t| async move {
        let mut revisions = Vec::new();
        for i in 0..20u64 {
            let w = store
                .write(put(&format!("w{t:02}"), &format!("{i}")))
                .await
                .unwrap();
            assert!(matches!(w.outcome, Outcome::Put { .. }), "{w:?}");
            revisions.push(w.revision);
        }
        revisions
    });
    let cases = (0..16u64).map(|_| async move {
        let w = store
            .write(Command::cas_revision(
                "base",
                first.revision + 10_000,
                b"x".to_vec(),
            ))
            .await
            .unwrap();
        assert_eq!(w.outcome, Outcome::Txn { succeeded: false });
    });
    let (revisions, ()) = tokio::join!(futures::future::join_all(puts), async {
        futures::future::join_all(cases).await;
    });
    let mut all: Vec<u64> = revisions.into_iter().flatten().collect();
    let acknowledged = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), acknowledged, "two writes got one revision");
    let last = *all.last().unwrap();
    c.wait_applied(last, T).await;
    for t in 0..48u64 {
        let (v, _) = get(&c.m(leader).store, &format!("w{t:02}"), Consistency::Stale).await;
        assert_eq!(v.as_deref(), Some(&b"19"[..]), "writer {t}");
    }
    let (base, _) = get(&c.m(leader).store, "base", Consistency::Stale).await;
    assert_eq!(base.as_deref(), Some(&b"0"[..]));
    let after = store.forwarded();
    let (writes, requests) = (
        after.writes - before.writes,
        after.requests - before.requests,
    );
    assert_eq!(writes, 48 * 20 + 16);
    assert!(
        requests < writes,
        "{writes} forwarded writes went in {requests} requests"
    );
    c.shutdown().await;
}

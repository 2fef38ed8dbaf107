//! The state-store contract as tests, run against every backend (embedded
//! and Redis): a backend passes exactly when it behaves like the others.
use workmanager_core::{Precondition, StateStore, StoreError, WriteOp};

pub(crate) async fn put_get_versions_and_cas(s: &dyn StateStore) {
    assert_eq!(s.get("a").await.unwrap(), None);
    let v1 = s
        .put("a", b"one".to_vec(), Precondition::Absent)
        .await
        .unwrap();
    assert_eq!(v1, 1);
    assert!(matches!(
        s.put("a", b"x".to_vec(), Precondition::Absent).await,
        Err(StoreError::Conflict(_))
    ));
    let v2 = s
        .put("a", b"two".to_vec(), Precondition::Version(v1))
        .await
        .unwrap();
    assert_eq!(v2, 2);
    assert!(matches!(
        s.put("a", b"stale".to_vec(), Precondition::Version(v1))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.put("missing", b"x".to_vec(), Precondition::Version(1))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let got = s.get("a").await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.version), (&b"two"[..], 2));
    // Binary values round-trip.
    let bytes: Vec<u8> = (0..=255).collect();
    s.put("bin", bytes.clone(), Precondition::None)
        .await
        .unwrap();
    assert_eq!(s.get("bin").await.unwrap().unwrap().value, bytes);
}

pub(crate) async fn commit_is_all_or_nothing(s: &dyn StateStore) {
    s.put("b", b"1".to_vec(), Precondition::None).await.unwrap();
    let r = s
        .commit(vec![
            WriteOp::Put {
                key: "c".into(),
                value: b"new".to_vec(),
                pre: Precondition::Absent,
            },
            WriteOp::Put {
                key: "b".into(),
                value: b"2".to_vec(),
                pre: Precondition::Absent,
            },
        ])
        .await;
    assert!(matches!(r, Err(StoreError::Conflict(k)) if k == "b"));
    assert_eq!(
        s.get("c").await.unwrap(),
        None,
        "first op of a failed commit leaked"
    );
    let versions = s
        .commit(vec![
            WriteOp::Put {
                key: "c".into(),
                value: b"new".to_vec(),
                pre: Precondition::Absent,
            },
            WriteOp::Delete {
                key: "b".into(),
                pre: Precondition::Version(1),
            },
        ])
        .await
        .unwrap();
    assert_eq!(versions, vec![Some(1), None]);
    assert_eq!(s.get("b").await.unwrap(), None);
}

pub(crate) async fn list_by_prefix_and_delete(s: &dyn StateStore) {
    for k in ["w/1", "w/2", "x/1", "w"] {
        s.put(k, vec![1], Precondition::None).await.unwrap();
    }
    assert_eq!(s.list("w/").await.unwrap(), vec!["w/1", "w/2"]);
    s.delete("w/1", Precondition::None).await.unwrap();
    assert_eq!(s.list("w/").await.unwrap(), vec!["w/2"]);
}

pub(crate) async fn concurrent_cas_has_one_winner(s: std::sync::Arc<dyn StateStore>) {
    s.put("race", b"0".to_vec(), Precondition::None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.put("race", vec![i], Precondition::Version(1))
                .await
                .is_ok()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(s.get("race").await.unwrap().unwrap().version, 2);
}

/// Creators racing for one new key (a worker record, a lease): exactly one
/// `Absent` write wins, and the key holds the winner's value.
pub(crate) async fn concurrent_creates_have_one_winner(s: std::sync::Arc<dyn StateStore>) {
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            match s.put("fresh", vec![i], Precondition::Absent).await {
                Ok(_) => Some(i),
                Err(StoreError::Conflict(_)) => None,
                Err(e) => panic!("creator {i}: {e}"),
            }
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let stored = s.get("fresh").await.unwrap().unwrap();
    assert_eq!((stored.value, stored.version), (winners, 1));
}

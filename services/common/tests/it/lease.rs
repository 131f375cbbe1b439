use std::time::Duration;

use async_nats::jetstream::kv;
use prost::Message;
use slipway_common::lease::{LeaseError, Leases};
use slipway_common::records::Records;
use slipway_proto::v1::{Lease, StoredRecord};
use slipway_test_support::NatsServer;

async fn bucket(server: &NatsServer) -> kv::Store {
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .create_key_value(kv::Config {
            bucket: "leases".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_lease_has_one_holder_and_its_revision_fences_the_others() {
    let server = NatsServer::start().unwrap();
    let store = bucket(&server).await;
    let a = Leases::new(store.clone(), "a").unwrap();
    let b = Leases::new(store.clone(), "b").unwrap();
    let ttl = Duration::from_secs(30);
    let name = "relay.run_1:sbx 1";

    let held = a
        .try_acquire(name, ttl)
        .await
        .unwrap()
        .expect("a free lease");
    assert_eq!(held.lease().holder, "a");
    assert!(b.try_acquire(name, ttl).await.unwrap().is_none(), "held");
    assert!(
        a.try_acquire(name, ttl).await.unwrap().is_none(),
        "a live lease is renewed, not taken twice, even by its holder"
    );
    // Stored as a record, under the encoded name.
    let (stored, revision) = Records::<Lease>::new(store.clone())
        .get("relay.run_1=3Asbx=201")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revision, held.revision());
    assert_eq!(&stored, held.lease());
    assert_eq!(b.current(name).await.unwrap(), Some((stored, revision)));

    assert_eq!(held.name(), name);
    assert_eq!((a.holder(), b.holder()), ("a", "b"));

    // Renewed for longer than it was taken: the expiry and the renewal time move, the
    // acquisition time stays, and what is returned is what is stored.
    let renewed = a.renew(&held, ttl * 2).await.unwrap();
    assert!(
        renewed.revision() > held.revision(),
        "a renewal moves the fence"
    );
    assert_eq!(renewed.name(), name);
    assert_eq!(renewed.lease().acquired_at, held.lease().acquired_at);
    let at = |t: &Option<pbjson_types::Timestamp>| t.map(|t| (t.seconds, t.nanos)).unwrap();
    assert!(at(&renewed.lease().expires_at) > at(&held.lease().expires_at));
    assert!(at(&renewed.lease().renewed_at) > at(&held.lease().renewed_at));
    assert!(at(&renewed.lease().expires_at) > at(&renewed.lease().renewed_at));
    assert_eq!(
        a.current(name).await.unwrap(),
        Some((renewed.lease().clone(), renewed.revision()))
    );
    let stale = a.renew(&held, ttl).await;
    assert!(
        matches!(stale, Err(LeaseError::Lost { revision, .. }) if revision == held.revision()),
        "{stale:?}"
    );
    assert!(matches!(
        a.release(held.clone()).await,
        Err(LeaseError::Lost { .. })
    ));

    a.release(renewed).await.unwrap();
    assert_eq!(a.current(name).await.unwrap(), None);
    let taken = b
        .try_acquire(name, ttl)
        .await
        .unwrap()
        .expect("a released lease is free at once");
    assert_eq!(taken.lease().holder, "b");
    assert!(taken.revision() > held.revision());

    // Revoked from elsewhere: its holder finds it lost at the next renewal.
    a.revoke(name).await.unwrap();
    assert!(matches!(
        b.renew(&taken, ttl).await,
        Err(LeaseError::Lost { .. })
    ));
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_once() {
    let server = NatsServer::start().unwrap();
    let store = bucket(&server).await;
    let a = Leases::new(store.clone(), "a").unwrap();
    let short = Duration::from_millis(300);
    let held = a.try_acquire("sampler", short).await.unwrap().unwrap();
    tokio::time::sleep(short + Duration::from_millis(100)).await;

    // Several contenders at once: exactly one gets it.
    let contenders: Vec<Leases> = (0..5)
        .map(|i| Leases::new(store.clone(), format!("c{i}")).unwrap())
        .collect();
    let tries = futures::future::join_all(
        contenders
            .iter()
            .map(|c| c.try_acquire("sampler", Duration::from_secs(30))),
    )
    .await;
    let winners: Vec<_> = tries.into_iter().filter_map(|t| t.unwrap()).collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert!(winners[0].revision() > held.revision());

    // The deposed holder's renewal is refused: the revision moved.
    assert!(matches!(
        a.renew(&held, short).await,
        Err(LeaseError::Lost { .. })
    ));
    assert_eq!(
        a.current("sampler").await.unwrap().unwrap().0.holder,
        winners[0].lease().holder
    );
}

#[tokio::test]
async fn wrong_leases_and_arguments_are_refused() {
    let server = NatsServer::start().unwrap();
    let store = bucket(&server).await;
    assert!(matches!(
        Leases::new(store.clone(), ""),
        Err(LeaseError::NoHolder)
    ));
    let a = Leases::new(store.clone(), "a").unwrap();
    assert!(matches!(
        a.try_acquire("x", Duration::ZERO).await,
        Err(LeaseError::Ttl(_))
    ));
    assert!(matches!(
        a.try_acquire("x", Duration::MAX).await,
        Err(LeaseError::Ttl(_))
    ));
    assert!(matches!(
        a.try_acquire("", Duration::from_secs(1)).await,
        Err(LeaseError::Name { .. })
    ));
    // Something else under a lease's key is not mistaken for a free lease.
    store
        .put(
            "other",
            StoredRecord {
                r#type: "slipway.v1.RelayRecord".into(),
                schema_version: 1,
                payload: vec![],
            }
            .encode_to_vec()
            .into(),
        )
        .await
        .unwrap();
    let e = a
        .try_acquire("other", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(e, LeaseError::Record(_)), "{e}");
}

#[tokio::test]
async fn a_release_that_cannot_reach_the_bucket_is_a_store_error_not_a_lost_lease() {
    let server = NatsServer::start().unwrap();
    let store = bucket(&server).await;
    let a = Leases::new(store.clone(), "a").unwrap();
    let held = a
        .try_acquire("sampler", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .delete_key_value("leases")
        .await
        .unwrap();
    let released = a.release(held).await;
    assert!(
        matches!(released, Err(LeaseError::Record(_))),
        "{released:?}"
    );
}

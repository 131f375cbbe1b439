use async_nats::jetstream::kv;
use prost::Message;
use slipway_common::records::{RecordError, Records};
use slipway_proto::v1::{Sandbox, SandboxRecord, StoredRecord};
use slipway_test_support::NatsServer;

fn record(id: &str) -> SandboxRecord {
    SandboxRecord {
        sandbox: Some(Sandbox {
            id: id.into(),
            ..Default::default()
        }),
        created_by: "run_1:create:1".into(),
        updated_at: None,
        restart: Vec::new(),
    }
}

#[tokio::test]
async fn records_are_versioned_and_revision_checked() {
    let server = NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let records = Records::<SandboxRecord>::new(store.clone());

    let rev = records.create("sbx_1", &record("sbx_1")).await.unwrap();
    assert!(matches!(
        records.create("sbx_1", &record("sbx_1")).await,
        Err(RecordError::Exists { .. })
    ));
    let (got, read_rev) = records.get("sbx_1").await.unwrap().unwrap();
    assert_eq!(got, record("sbx_1"));
    assert_eq!(read_rev, rev);

    let next = records
        .update("sbx_1", &record("sbx_1b"), read_rev)
        .await
        .unwrap();
    assert!(next > read_rev);
    let stale = records.update("sbx_1", &record("sbx_1c"), read_rev).await;
    assert!(
        matches!(stale, Err(RecordError::Conflict { .. })),
        "{stale:?}"
    );
    assert_eq!(
        records.get("sbx_1").await.unwrap().unwrap().0,
        record("sbx_1b"),
        "the stale write lost nothing"
    );
    assert!(records.get("missing").await.unwrap().is_none());

    // A record from a newer schema is refused, not misread.
    let newer = StoredRecord {
        r#type: "slipway.v1.SandboxRecord".into(),
        schema_version: 2,
        payload: record("sbx_2").encode_to_vec(),
    };
    store
        .put("sbx_2", newer.encode_to_vec().into())
        .await
        .unwrap();
    let e = records.get("sbx_2").await.unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::NewerSchema {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );

    // So is a record of another type, and garbage.
    let other = StoredRecord {
        r#type: "slipway.v1.RunRecord".into(),
        schema_version: 1,
        payload: vec![],
    };
    store
        .put("sbx_3", other.encode_to_vec().into())
        .await
        .unwrap();
    assert!(matches!(
        records.get("sbx_3").await,
        Err(RecordError::WrongType { .. })
    ));
    store
        .put("sbx_4", bytes::Bytes::from_static(&[0xff, 0xff, 0xff]))
        .await
        .unwrap();
    assert!(matches!(
        records.get("sbx_4").await,
        Err(RecordError::Decode { .. })
    ));
}

use async_nats::jetstream::object_store;
use rand::RngCore;
use slipway_common::blobs::{BlobError, Blobs};
use slipway_test_support::NatsServer;

async fn blobs(server: &NatsServer) -> (Blobs, object_store::ObjectStore) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let store = async_nats::jetstream::new(client)
        .create_object_store(object_store::Config {
            bucket: "slipway_blobs".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    (Blobs::new(store.clone()), store)
}

#[tokio::test]
async fn a_5_mb_value_goes_to_the_object_store_and_back() {
    let server = NatsServer::start().unwrap();
    let (blobs, _) = blobs(&server).await;
    let mut value = vec![0u8; 5 * 1024 * 1024];
    rand::rng().fill_bytes(&mut value);
    let blob = blobs.put("run_1:plan:1", &value).await.unwrap();
    assert_eq!(blob.bucket, "slipway_blobs");
    assert_eq!(blob.name, "run_1:plan:1");
    assert_eq!(blob.size, value.len() as u64);
    assert_eq!(blob.sha256.len(), 64);
    let got = blobs.get(&blob).await.unwrap();
    assert!(got[..] == value[..], "the value comes back byte-identical");

    // An empty value is a value too.
    let empty = blobs.put("empty", b"").await.unwrap();
    assert_eq!(blobs.get(&empty).await.unwrap().len(), 0);
}

#[tokio::test]
async fn a_changed_or_missing_blob_is_refused() {
    let server = NatsServer::start().unwrap();
    let (blobs, store) = blobs(&server).await;
    let blob = blobs.put("model_output", b"the answer").await.unwrap();

    // Replaced under the same name with the same size: only the digest tells.
    store
        .put("model_output", &mut &b"THE ANSWER"[..])
        .await
        .unwrap();
    let e = blobs.get(&blob).await.unwrap_err();
    assert!(matches!(e, BlobError::Digest { .. }), "{e}");

    // Replaced with another size: refused before it is read.
    store
        .put("model_output", &mut &b"a longer answer"[..])
        .await
        .unwrap();
    let e = blobs.get(&blob).await.unwrap_err();
    assert!(
        matches!(
            e,
            BlobError::Size {
                expected: 10,
                found: 15,
                ..
            }
        ),
        "{e}"
    );

    // A reference that was altered.
    let fresh = blobs.put("model_output", b"the answer").await.unwrap();
    let mut forged = fresh.clone();
    forged.sha256 = "00".repeat(32);
    assert!(matches!(
        blobs.get(&forged).await,
        Err(BlobError::Digest { .. })
    ));
    let mut elsewhere = fresh.clone();
    elsewhere.bucket = "other".into();
    assert!(matches!(
        blobs.get(&elsewhere).await,
        Err(BlobError::WrongBucket { .. })
    ));
    assert_eq!(&blobs.get(&fresh).await.unwrap()[..], b"the answer");

    // Deleted (as past the retention), or never written.
    store.delete("model_output").await.unwrap();
    let e = blobs.get(&fresh).await.unwrap_err();
    assert!(matches!(e, BlobError::Missing { .. }), "{e}");
    assert!(e.to_string().contains("model_output"), "{e}");
    let mut never = fresh.clone();
    never.name = "never".into();
    assert!(matches!(
        blobs.get(&never).await,
        Err(BlobError::Missing { .. })
    ));
    never.name = String::new();
    assert!(matches!(blobs.get(&never).await, Err(BlobError::NoName)));
    assert!(matches!(blobs.put("", b"x").await, Err(BlobError::NoName)));
}

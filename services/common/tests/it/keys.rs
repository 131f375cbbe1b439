use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream::kv;
use futures::StreamExt;
use rand::Rng;
use slipway_common::keys::{KeyError, MAX_KEY_LEN, decode_key, decode_key_str, encode_key};
use slipway_common::subjects::user_token;
use slipway_test_support::NatsServer;

/// What a JetStream KV key may be, as the server and client take it.
fn is_kv_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
}

/// Ids weighted towards the bytes the encoding must handle: `.` in every position, `=`, `:`,
/// the other KV-alphabet bytes, controls, non-ASCII and invalid UTF-8.
fn random_id(rng: &mut impl Rng, max_len: usize) -> Vec<u8> {
    let len = rng.random_range(1..=max_len);
    (0..len)
        .map(|_| match rng.random_range(0..5) {
            0 => b".=:/-_ *>"[rng.random_range(0..9)],
            1 => rng.random_range(0..=u8::MAX),
            2 => rng.random_range(b'A'..=b'Z'),
            _ => rng.random_range(b'a'..=b'z'),
        })
        .collect()
}

#[test]
fn hostile_ids_round_trip_as_valid_kv_keys() {
    let cases: [&[u8]; 18] = [
        b"sbx_1",
        b"run_1:create:1",
        b"a.b@c d",
        b".",
        b"..",
        b"...",
        b".a",
        b"a.",
        b"a..b",
        b"=",
        b"=41",
        b"/",
        b"a/b",
        b"*>",
        "ü.ñ".as_bytes(),
        b"\0",
        b"\xff\xfe",
        b"UPPER-lower_9.x",
    ];
    for id in cases {
        let key = encode_key(id).unwrap();
        assert!(is_kv_key(&key), "{id:?} -> {key:?} is a KV key");
        assert_eq!(decode_key(&key).unwrap(), id, "{key:?}");
    }
    // Readable ids stay as they are, so keys written before the encoding are unchanged.
    for id in [
        "sbx_1",
        "executor.sampler",
        "job.dj_00ff",
        "sbx_1.exec_count",
        "a/b",
    ] {
        assert_eq!(encode_key(id).unwrap(), id);
    }
    assert_eq!(encode_key("run_1:create:1").unwrap(), "run_1=3Acreate=3A1");
    assert_eq!(encode_key("a..b").unwrap(), "a.=2Eb");
    assert_eq!(encode_key(".").unwrap(), "=2E");
    assert_eq!(encode_key(".a").unwrap(), "=2Ea");
    assert_eq!(encode_key("a.").unwrap(), "a=2E");
    assert_eq!(decode_key_str("a.=2Eb").unwrap(), "a..b");
    assert_eq!(
        decode_key_str("=FF"),
        Err(KeyError::NotUtf8("=FF".into())),
        "bytes that are not text are refused as text"
    );
}

#[test]
fn what_encode_key_would_not_produce_is_refused() {
    assert_eq!(encode_key(""), Err(KeyError::Empty));
    assert_eq!(encode_key(b""), Err(KeyError::Empty));
    assert_eq!(decode_key(""), Err(KeyError::Empty));
    for bad in [
        "=4", "=zz", "=2e", "=41", "a:b", "a b", ".a", "a.", "a..b", "a=2E.b", "a=2E=2E", "ü", "*",
    ] {
        assert_eq!(
            decode_key(bad),
            Err(KeyError::NotEncoded(bad.into())),
            "{bad:?} is not canonical"
        );
    }
    // `a=2E.b` and `a=2E=2E` escape a `.` the encoding keeps (`a..b` is `a.=2Eb`, `a..` is
    // `a.=2E`).
    let longest = "x".repeat(MAX_KEY_LEN);
    assert_eq!(encode_key(&longest).unwrap(), longest);
    assert_eq!(
        encode_key("x".repeat(MAX_KEY_LEN + 1)),
        Err(KeyError::TooLong {
            len: MAX_KEY_LEN + 1,
            max: MAX_KEY_LEN
        })
    );
    assert_eq!(
        encode_key(":".repeat(MAX_KEY_LEN / 3 + 1)),
        Err(KeyError::TooLong {
            len: 3 * (MAX_KEY_LEN / 3 + 1),
            max: MAX_KEY_LEN
        }),
        "the limit is on the encoded key"
    );
}

#[test]
fn random_ids_round_trip_and_never_collide() {
    let mut rng = rand::rng();
    let mut seen = HashMap::new();
    for _ in 0..slipway_test_support::random_cases() * 8 {
        let id = random_id(&mut rng, 24);
        let key = encode_key(&id).unwrap();
        assert!(is_kv_key(&key), "{id:?} -> {key:?}");
        assert_eq!(decode_key(&key).unwrap(), id);
        if let Some(other) = seen.insert(key.clone(), id.clone()) {
            assert_eq!(other, id, "two ids share the key {key}");
        }
    }
}

#[test]
fn random_text_ids_encode_as_their_user_token_where_no_dot_or_slash_is_kept() {
    let mut rng = rand::rng();
    for _ in 0..slipway_test_support::random_cases() * 4 {
        let len = rng.random_range(1..24);
        let id: String = (0..len)
            .map(|_| match rng.random_range(0..3) {
                0 => char::from(rng.random_range(b' '..=b'~')),
                1 => char::from_u32(rng.random_range(0xa0..0x2fff)).unwrap_or('x'),
                _ => char::from(rng.random_range(b'a'..=b'z')),
            })
            .filter(|c| !matches!(c, '.' | '/'))
            .collect();
        if id.is_empty() {
            continue;
        }
        assert_eq!(encode_key(&id).unwrap(), user_token(&id).unwrap(), "{id:?}");
        assert_eq!(decode_key_str(&encode_key(&id).unwrap()).unwrap(), id);
    }
}

/// Any string over the key alphabet either decodes to an id that encodes back to it, or is
/// refused: decoding never maps two keys to one id.
#[test]
fn random_keys_decode_only_when_canonical() {
    let mut rng = rand::rng();
    let alphabet = b"=.:AF09az_-/ ";
    let mut decoded = 0;
    for _ in 0..slipway_test_support::random_cases() * 8 {
        let len = rng.random_range(1..16);
        let key: String = (0..len)
            .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
            .collect();
        if let Ok(id) = decode_key(&key) {
            decoded += 1;
            assert_eq!(encode_key(&id).unwrap(), key);
        }
    }
    assert!(decoded > 0, "some random keys are canonical");
}

/// Every encoded key is taken by a real bucket, stored under itself, and listed back as the id.
#[tokio::test]
async fn encoded_keys_are_accepted_by_a_real_kv_bucket() {
    let server = NatsServer::start().unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "keys".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut rng = rand::rng();
    let mut ids: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut all: Vec<Vec<u8>> = (0..slipway_test_support::random_cases())
        .map(|_| random_id(&mut rng, 40))
        .collect();
    all.extend([
        b".".to_vec(),
        b"..".to_vec(),
        b"a..b.".to_vec(),
        b"run_1:create:1".to_vec(),
        vec![0xff; MAX_KEY_LEN / 3],
    ]);
    for id in all {
        let key = encode_key(&id).unwrap();
        store
            .put(&key, bytes::Bytes::from(id.clone()))
            .await
            .unwrap_or_else(|e| panic!("{id:?} -> {key:?}: {e}"));
        ids.insert(key, id);
    }
    for (key, id) in &ids {
        let got = store.get(key).await.unwrap().expect(key);
        assert_eq!(&got[..], &id[..], "{key:?}");
    }
    let mut listed = BTreeMap::new();
    let mut keys = store.keys().await.unwrap();
    while let Some(key) = keys.next().await {
        let key = key.unwrap();
        listed.insert(key.clone(), decode_key(&key).unwrap());
    }
    assert_eq!(
        listed, ids,
        "the bucket lists every key, and each decodes to its id"
    );
}

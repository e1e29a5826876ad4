//! Waiting for a value under one etcd key, by watching it (no polling).

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};

/// Waits until the value under `key` satisfies `ok` (`None`: the key is missing), watching the
/// key from the revision of a first read. Errs with `why` after `timeout`.
pub async fn until_value(
    client: &mut Client,
    key: &str,
    timeout: Duration,
    why: &str,
    ok: impl Fn(Option<&[u8]>) -> bool,
) -> Result<(), String> {
    let got = client.get(key, None).await.map_err(|e| e.to_string())?;
    if ok(got.kvs().first().map(|kv| kv.value())) {
        return Ok(());
    }
    let from = got.header().map_or(0, |h| h.revision()) + 1;
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(from)))
        .await
        .map_err(|e| e.to_string())?;
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                let value = match ev.event_type() {
                    EventType::Put => ev.kv().map(|kv| kv.value()),
                    EventType::Delete => None,
                };
                if ok(value) {
                    return true;
                }
            }
        }
        false
    })
    .await;
    match found {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("{why}: the watch of {key} ended")),
        Err(_) => Err(format!("{why}: not within {timeout:?}")),
    }
}

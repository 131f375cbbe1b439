//! TLS for Slipway's HTTP clients: rustls with the ring provider (the one async-nats already
//! uses), installed process-wide once, before any client is built. reqwest is built without a
//! provider of its own, so every binary and test that makes HTTP clients calls this first.

/// Installs the ring provider as the process default; later calls do nothing.
pub fn install_default_provider() {
    // Fails only when a provider is installed already, which is the state wanted.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

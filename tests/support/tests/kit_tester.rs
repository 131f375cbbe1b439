//! The kit's test worker refuses a wrong command line with its usage (building this test also
//! builds the binary the kit's partition tests run).

#[test]
fn the_kit_tester_refuses_a_wrong_command_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slipway-kit-tester"))
        .arg("nats://127.0.0.1:1")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("usage: slipway-kit-tester"), "{stderr}");
}

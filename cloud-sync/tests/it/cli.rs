//! The `cloud-sync` binary: config commands, device management, serve + SIGTERM.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use cloud_sync::config::{Config, DEFAULT_CONFIG_TOML};

use crate::backends::PgSchema;
use crate::util::raw_http;

const BIN: &str = env!("CARGO_BIN_EXE_cloud-sync");

fn run(args: &[&str]) -> Result<Output> {
    Ok(Command::new(BIN).args(args).env("NO_COLOR", "1").output()?)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_config(dir: &Path, extra: &str) -> Result<String> {
    let path = dir.join("cloud-sync.toml");
    let db = dir.join("cloud.db");
    std::fs::write(
        &path,
        format!(
            "listen_addr = \"127.0.0.1:0\"\ndatabase_path = {:?}\n{extra}",
            db.display().to_string()
        ),
    )?;
    Ok(path.display().to_string())
}

#[test]
fn default_config_round_trips_through_check_config() -> Result<()> {
    let output = run(&["print-default-config"])?;
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout)?;
    assert_eq!(text, DEFAULT_CONFIG_TOML);
    Config::from_toml_str(&text)?.validate()?;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("default.toml");
    std::fs::write(&path, text)?;
    let output = run(&["check-config", &path.display().to_string()])?;
    assert!(output.status.success(), "{}", stderr(&output));
    Ok(())
}

#[test]
fn bad_config_exits_78_naming_the_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: [(&str, &[&str]); 6] = [
        (
            "tls_cert_file = \"/nonexistent/server.pem\"\n",
            &["tls_key_file"],
        ),
        (
            "tls_cert_file = \"/nonexistent/server.pem\"\ntls_key_file = \"/nonexistent/server.key\"\n",
            &["tls_cert_file"],
        ),
        (
            "listen_addr = \"nowhere\"\nmax_body_bytes = 0\nrequest_timeout_secs = 0\n",
            &["listen_addr", "max_body_bytes", "request_timeout_secs"],
        ),
        ("max_body_size = 10\n", &["max_body_size"]),
        (
            "database_url = \"postgres://sync@/cloud\"\ndatabase_max_connections = 0\n",
            &["database_url", "database_max_connections"],
        ),
        (
            "request_timeout_secs = \"30s\"\n",
            &["request_timeout_secs"],
        ),
    ];
    for (text, keys) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text)?;
        let path = path.display().to_string();
        for args in [
            vec!["check-config", path.as_str()],
            vec!["serve", "--config", path.as_str()],
            vec!["devices", "add", "dev-1", "--config", path.as_str()],
        ] {
            let output = run(&args)?;
            assert_eq!(output.status.code(), Some(78), "{args:?}");
            let err = stderr(&output);
            for key in keys {
                assert!(err.contains(&format!("`{key}`")), "{args:?}: {err}");
            }
        }
    }
    let output = run(&["check-config", "/nonexistent/cloud-sync.toml"])?;
    assert_eq!(output.status.code(), Some(78));
    Ok(())
}

#[test]
fn devices_add_prints_a_token_once_and_revoke_works() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "")?;

    let output = run(&["devices", "add", "dev-1", "--config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));
    let token = String::from_utf8(output.stdout)?;
    let token = token.trim();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));

    let output = run(&["devices", "add", "dev-1", "--config", &config])?;
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(
        stderr(&output).contains("already exists"),
        "{}",
        stderr(&output)
    );

    let output = run(&["devices", "add", "bad/id", "--config", &config])?;
    assert_eq!(output.status.code(), Some(1));

    let output = run(&["devices", "revoke", "dev-1", "--config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(&["devices", "revoke", "nobody", "--config", &config])?;
    assert_eq!(output.status.code(), Some(1));
    Ok(())
}

#[test]
fn operators_add_prints_a_token_once_and_revoke_works() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "")?;
    let output = run(&["operators", "add", "ops", "--config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));
    let token = String::from_utf8(output.stdout)?;
    assert_eq!(token.trim().len(), 64);
    let output = run(&["operators", "add", "ops", "--config", &config])?;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("already exists"),
        "{}",
        stderr(&output)
    );
    let output = run(&["operators", "revoke", "ops", "--config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(&["operators", "revoke", "nobody", "--config", &config])?;
    assert_eq!(output.status.code(), Some(1));
    Ok(())
}

#[tokio::test]
async fn devices_commands_work_on_postgres() -> Result<()> {
    let Some(schema) = PgSchema::create("devices_commands_work_on_postgres").await? else {
        println!("skipped");
        return Ok(());
    };
    let base = std::env::var(crate::backends::POSTGRES_ENV)?;
    let separator = if base.contains('?') { '&' } else { '?' };
    // The schema is chosen the way the default config documents.
    let url = format!(
        "{base}{separator}options=-c%20search_path%3D{}",
        schema.name
    );
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &format!("database_url = {url:?}\n"))?;

    let output = run(&["check-config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(&["devices", "add", "dev-1", "--config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));
    let token = String::from_utf8(output.stdout)?;
    assert_eq!(token.trim().len(), 64);
    let output = run(&["devices", "add", "dev-1", "--config", &config])?;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("already exists"),
        "{}",
        stderr(&output)
    );
    let output = run(&["devices", "revoke", "dev-1", "--config", &config])?;
    assert!(output.status.success(), "{}", stderr(&output));

    let revoked: bool = schema
        .client()
        .await?
        .query_one("SELECT revoked FROM devices WHERE id = 'dev-1'", &[])
        .await?
        .try_get(0)?;
    assert!(revoked);
    assert!(!dir.path().join("cloud.db").exists(), "sqlite file created");
    Ok(())
}

#[test]
fn version_flag() -> Result<()> {
    let output = run(&["--version"])?;
    assert!(output.status.success());
    assert!(String::from_utf8(output.stdout)?.contains(env!("CARGO_PKG_VERSION")));
    Ok(())
}

#[tokio::test]
async fn serve_stops_cleanly_on_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "")?;
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &config])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .context("server did not log its address")?;
        if line.contains("cloud-sync listening") {
            let addr = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .context("no addr field")?;
            break addr.parse::<std::net::SocketAddr>()?;
        }
    };
    let (status, body) = raw_http(addr, "GET", "/healthz", &[], b"").await?;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(killed.success());
    let exit = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .context("server did not exit after SIGTERM")???;
    // stderr is closed once the process exited, so the reader finishes.
    reader.join().ok();
    let logged: Vec<String> = lines_rx.try_iter().collect();
    if !exit.success() {
        bail!("serve exited with {exit}: {logged:#?}");
    }
    assert!(logged.iter().any(|l| l.contains("SIGTERM")), "{logged:#?}");
    Ok(())
}

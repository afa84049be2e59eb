//! The embedded mode's conveniences: a development secret when no
//! authentication is configured, and a start-up banner that says how to try it.

use std::net::SocketAddr;

use switchboard_shared::config::Settings;

/// File under `DATA_DIR` keeping the generated development secret, so
/// tokens stay valid across restarts.
const SECRET_FILE: &str = "dev-secret";

/// Generates (or reloads) a development secret when no authentication is
/// configured, so a newcomer can connect without a Clerk instance.
pub fn prepare(settings: &mut Settings) -> anyhow::Result<()> {
    let configured = settings.auth_jwks_url.is_some()
        || settings.auth_public_key.is_some()
        || settings.auth_public_key_file.is_some()
        || settings.auth_dev_secret.is_some();
    if configured {
        return Ok(());
    }
    let path = settings.data_dir.join(SECRET_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
        _ => {
            let bytes: [u8; 32] = rand::random();
            let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&path, &secret)?;
            secret
        }
    };
    tracing::warn!(
        file = %path.display(),
        "embedded mode without AUTH_* settings: generated a development secret (HS256 tokens accepted)"
    );
    settings.auth_dev_secret = Some(secret);
    Ok(())
}

pub fn print_banner(settings: &Settings, addr: SocketAddr) {
    let host = if addr.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        addr.ip().to_string()
    };
    let data = settings.data_dir.display();
    eprintln!(
        "\n  Switchboard (embedded: in-process bus, SQLite in {data})\n\
         \n  Open       http://{host}:{port}/  (demo page)\
         \n  Socket.IO  ws://{host}:{port}/api/socket.io\
         \n  Token      AUTH_DEV_SECRET=$(cat {data}/dev-secret) switchboard-gateway dev-token --user alice\n",
        port = addr.port()
    );
}

//! The outbound policy on the DTM API front door: every spelling of a refused address is a 400
//! at submit and registerBranch, before any call; a DNS name resolving to a refused address and
//! a redirect to one are never followed. Every service listens on 127.0.0.x (the "refused" one on
//! 127.0.0.2); no traffic leaves the loopback range. And what is sent is not shown: header values
//! and URL credentials never appear in an answer or a log line. HTTPS branches are trusted
//! through the configured CA bundle and get the configured client certificate (mTLS).

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use common::{Bank, Trap, address_spellings};
use kubetx::config::Config;
use kubetx::invoke::Invoker;
use kubetx::invoke::policy::OutboundPolicy;
use kubetx::metrics::Metrics;
use kubetx::scheduler::OffsetClock;
use kubetx::server::Server;
use serde_json::{Value, json};
use tempfile::TempDir;

const BANK_IP: [u8; 4] = [127, 0, 0, 1];
const TRAP_IP: [u8; 4] = [127, 0, 0, 2];

struct Api {
    server: Server,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Api {
    /// A server allowing `*.allowed.test` and 127.0.0.1 only, where `bank.allowed.test` resolves
    /// to 127.0.0.1 and `trap.allowed.test` to 127.0.0.2.
    async fn locked_down() -> Self {
        let policy =
            OutboundPolicy::new(&["*.allowed.test".to_owned()], &["127.0.0.1/32".to_owned()]).expect("valid policy");
        Self::start(policy).await
    }

    async fn start(policy: OutboundPolicy) -> Self {
        let invoker = Invoker::builder(policy)
            .static_host("bank.allowed.test", &[IpAddr::from(BANK_IP)])
            .static_host("trap.allowed.test", &[IpAddr::from(TRAP_IP)])
            .build()
            .expect("client");
        Self::with_invoker(invoker).await
    }

    async fn with_invoker(invoker: Invoker) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            listen: "127.0.0.1:0".to_owned(),
            grpc_listen: String::new(),
            ..Config::default()
        };
        config.sqlite.path = dir.path().join("kubetx.db").display().to_string();
        let clock = Arc::new(OffsetClock::default());
        let server = Server::start_with_invoker(&config, clock, false, Arc::new(Metrics::new()), invoker)
            .await
            .expect("server starts");
        Api {
            server,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn post(&self, route: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/{route}", self.server.dtm_url()))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn saga(&self, gid: &str, actions: &[String]) -> (u16, Value) {
        let steps: Vec<Value> = actions.iter().map(|a| json!({"action": a, "compensate": ""})).collect();
        let payloads: Vec<Value> = actions.iter().map(|_| json!("{}")).collect();
        self.post(
            "submit",
            json!({"gid": gid, "trans_type": "saga", "wait_result": true, "steps": steps, "payloads": payloads}),
        )
        .await
    }
}

fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn every_spelling_of_a_refused_address_is_a_400_before_any_call() {
    let api = Api::locked_down().await;
    let trap = Trap::start(TRAP_IP).await;
    let (status, _) = api
        .post("prepare", json!({"gid": "tcc-open", "trans_type": "tcc"}))
        .await;
    assert_eq!(status, 200);
    let spellings = address_spellings(TRAP_IP, trap.addr.port(), "bank.allowed.test");
    for (index, url) in spellings.iter().enumerate() {
        let (status, body) = api.saga(&format!("spelled-{index}"), std::slice::from_ref(url)).await;
        assert_eq!(status, 400, "submit with {url}: {body}");
        assert!(message(&body).starts_with("endpoint refused: action:"), "{url}: {body}");
        let register = json!({"gid": "tcc-open", "trans_type": "tcc", "branch_id": format!("{index:02}"),
            "confirm": url, "cancel": ""});
        let (status, body) = api.post("registerBranch", register).await;
        assert_eq!(status, 400, "registerBranch with {url}: {body}");
        assert!(
            message(&body).starts_with("endpoint refused: confirm:"),
            "{url}: {body}"
        );
    }
    assert_eq!(trap.hits(), 0, "no call reached the refused address");
    // The issue's own example, with 127.0.0.0/8 not allowed at all.
    let cluster = Api::start(OutboundPolicy::cluster(&[], &[], "svc").expect("policy")).await;
    let (status, body) = cluster
        .saga(
            "issue",
            &["http://127.0.0.1:18081\\@bank.default.svc/api/Backslash".to_owned()],
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        message(&body),
        "endpoint refused: action: 127.0.0.1 is not in the allowed address ranges"
    );
}

#[tokio::test]
async fn the_spellings_really_reach_the_address_when_it_is_allowed() {
    // The control of the test above: with a permissive policy the same spellings dial the trap,
    // so the refusals above are refusals of 127.0.0.2 and not of malformed URLs.
    let api = Api::start(OutboundPolicy::permissive()).await;
    let trap = Trap::start(TRAP_IP).await;
    let spellings = address_spellings(TRAP_IP, trap.addr.port(), "bank.allowed.test");
    let reachable: Vec<&String> = spellings
        .iter()
        .filter(|u| u.starts_with("http://") && !u.contains('[') && !u.contains("169.254") && !u.contains("0xa9fe"))
        .collect();
    assert_eq!(reachable.len(), 10, "{reachable:?}");
    for (index, url) in reachable.iter().enumerate() {
        let (status, body) = api.saga(&format!("control-{index}"), &[(*url).clone()]).await;
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(trap.hits(), index + 1, "{url} reached 127.0.0.2");
    }
    // Metadata stays refused even here.
    let (status, body) = api
        .saga("metadata", &["http://[::ffff:169.254.169.254]/latest".to_owned()])
        .await;
    assert_eq!(status, 400);
    assert!(message(&body).contains("never called"), "{body}");
}

#[tokio::test]
async fn a_name_resolving_to_a_refused_address_is_never_dialed() {
    let api = Api::locked_down().await;
    let bank = Bank::start().await;
    let trap = Trap::start(TRAP_IP).await;
    let allowed = format!("http://bank.allowed.test:{}/api/TransOut", bank.addr.port());
    let refused = format!("http://trap.allowed.test.:{}/x", trap.addr.port());
    let (status, body) = api.saga("dns", &[allowed, refused]).await;
    // Accepted (names are resolved at call time); the first step ran, the second is retried.
    assert_eq!(status, 425, "{body}");
    assert!(
        message(&body).contains("resolves only to refused addresses: 127.0.0.2 is not in the allowed address ranges"),
        "{body}"
    );
    assert_eq!(
        bank.count("dns", "TransOut"),
        1,
        "the allowed name resolved and was called"
    );
    assert_eq!(trap.hits(), 0);
}

#[tokio::test]
async fn a_redirect_is_an_unknown_outcome_and_never_followed() {
    let api = Api::locked_down().await;
    let trap = Trap::start(TRAP_IP).await;
    let redirector = Trap::redirecting(BANK_IP, trap.url("/stolen")).await;
    let (status, body) = api.saga("redirect", &[redirector.url("/go")]).await;
    assert_eq!(status, 425, "retried, not failed: {body}");
    assert!(message(&body).contains("status 302"), "{body}");
    assert_eq!(redirector.hits(), 1);
    assert_eq!(trap.hits(), 0, "the redirect was not followed");
}

/// Every log line of this test binary, at every level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        logs
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn header_values_and_url_credentials_are_never_shown() {
    const TOKEN: &str = "Bearer s3cret-t0ken";
    const PASSWORD: &str = "pa55w0rd";
    let logs = captured_logs();
    let api = Api::start(OutboundPolicy::permissive()).await;
    let bank = Bank::start().await;
    let with_credentials = |url: String| url.replacen("http://", &format!("http://alice:{PASSWORD}@"), 1);
    let closed = format!("http://{}/api/Closed", common::free_addr());
    let body = json!({"gid": "secret", "trans_type": "saga", "wait_result": true,
        "branch_headers": {"Authorization": TOKEN},
        "steps": [{"action": with_credentials(bank.url("TransOut")), "compensate": ""},
                  {"action": with_credentials(closed), "compensate": ""}],
        "payloads": ["{}", "{}"]});
    let (status, answer) = api.post("submit", body).await;
    assert_eq!(status, 425, "the closed port is an unknown outcome: {answer}");
    let sent = bank.calls().into_iter().find(|c| c.gid == "secret").expect("called");
    assert_eq!(sent.headers["authorization"], TOKEN, "the header is sent");
    let mut shown = vec![answer.to_string()];
    for route in ["query?gid=secret", "all", "all?gid=secret"] {
        let response = api
            .http
            .get(format!("{}/{route}", api.server.dtm_url()))
            .send()
            .await
            .expect("request");
        shown.push(response.text().await.expect("body"));
    }
    assert!(
        shown[1].contains("<redacted>") && shown[1].contains("Authorization"),
        "{}",
        shown[1]
    );
    assert!(shown[1].contains("api/TransOut"), "{}", shown[1]);
    let logged = String::from_utf8_lossy(&logs.lock().expect("log lock")).into_owned();
    assert!(logged.contains("secret"), "the test saw this transaction's log lines");
    for text in shown.iter().chain([&logged]) {
        assert!(!text.contains("s3cret-t0ken"), "header value shown: {text}");
        assert!(!text.contains(PASSWORD), "URL password shown: {text}");
    }
}

fn tls_fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A branch service on HTTPS (127.0.0.1, the test CA's server certificate) answering SUCCESS;
/// with `client_ca`, it requires a client certificate that CA signed.
struct HttpsBranch {
    addr: std::net::SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
}

impl HttpsBranch {
    async fn start(client_ca: Option<&str>) -> Self {
        let client_ca = client_ca.map(tls_fixture);
        let config = kubetx::tls::server_config(
            tls_fixture("server.pem").as_ref(),
            tls_fixture("server.key").as_ref(),
            client_ca.as_deref().map(std::path::Path::new),
            b"http/1.1",
        )
        .expect("server TLS");
        let tcp = tokio::net::TcpListener::bind((IpAddr::from(BANK_IP), 0))
            .await
            .expect("bind");
        let stop = tokio_util::sync::CancellationToken::new();
        let config = tokio::sync::watch::channel(config).1;
        let listener = kubetx::tls::TlsListener::new(tcp, config, stop.clone()).expect("listener");
        let addr = axum::serve::Listener::local_addr(&listener).expect("address");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let router = axum::Router::new().route(
            "/ok",
            axum::routing::any(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { r#"{"dtm_result":"SUCCESS"}"# }
            }),
        );
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
        });
        HttpsBranch { addr, hits, stop }
    }

    fn url(&self) -> String {
        format!("https://{}/ok", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HttpsBranch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A server whose branch client is configured as `adjust` sets the configuration's branch TLS
/// keys (the path `kubetx serve` and `kubetx operator` take).
async fn api_with_branch_tls(adjust: impl FnOnce(&mut Config)) -> Api {
    let mut config = Config::default();
    adjust(&mut config);
    config.validate().expect("valid configuration");
    let invoker = config
        .invoker(config.outbound_policy().expect("policy"))
        .expect("client");
    Api::with_invoker(invoker).await
}

#[tokio::test]
async fn an_https_branch_signed_by_the_configured_ca_is_trusted() {
    let branch = HttpsBranch::start(None).await;
    let trusting = api_with_branch_tls(|c| c.branch_ca_file = tls_fixture("ca.pem")).await;
    let (status, body) = trusting.saga("https-trusted", &[branch.url()]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(branch.hits(), 1);
    // Without the CA, the certificate is not trusted: an unknown outcome, retried, not a failure.
    let plain = api_with_branch_tls(|_| {}).await;
    let (status, body) = plain.saga("https-untrusted", &[branch.url()]).await;
    assert_eq!(status, 425, "retried, not failed: {body}");
    assert!(message(&body).contains("certificate"), "{body}");
    assert_eq!(branch.hits(), 1, "no request was sent over the untrusted connection");
}

#[tokio::test]
async fn a_branch_requiring_a_client_certificate_gets_the_configured_one() {
    let branch = HttpsBranch::start(Some("client-ca.pem")).await;
    let identified = api_with_branch_tls(|c| {
        c.branch_ca_file = tls_fixture("ca.pem");
        c.branch_client_cert_file = tls_fixture("client.pem");
        c.branch_client_key_file = tls_fixture("client.key");
    })
    .await;
    let (status, body) = identified.saga("mtls-identified", &[branch.url()]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(branch.hits(), 1);
    let anonymous = api_with_branch_tls(|c| c.branch_ca_file = tls_fixture("ca.pem")).await;
    let (status, body) = anonymous.saga("mtls-anonymous", &[branch.url()]).await;
    assert_eq!(status, 425, "retried, not failed: {body}");
    assert_eq!(branch.hits(), 1, "the branch never saw the anonymous call");
}

#[test]
fn branch_tls_files_are_checked_at_start_and_never_quoted() {
    let key_text = std::fs::read_to_string(tls_fixture("client.key")).expect("key");
    let key_line = key_text.lines().nth(1).expect("a base64 line");
    // (CA bundle, client certificate, client key): empty for none.
    let start = |[ca, cert, key]: [&str; 3]| -> Result<(), String> {
        let file = |name: &str| {
            if name.is_empty() {
                String::new()
            } else {
                tls_fixture(name)
            }
        };
        let config = Config {
            branch_ca_file: file(ca),
            branch_client_cert_file: file(cert),
            branch_client_key_file: file(key),
            ..Config::default()
        };
        config.validate().map_err(|e| e.to_string())?;
        config
            .invoker(OutboundPolicy::permissive())
            .map(drop)
            .map_err(|e| e.to_string())
    };
    // Certificate and key go together.
    let error = start(["", "client.pem", ""]).unwrap_err();
    assert!(error.contains("branch_client_key_file"), "{error}");
    let error = start(["", "", "client.key"]).unwrap_err();
    assert!(error.contains("branch_client_cert_file"), "{error}");
    let cases = [
        ("missing.pem", ["missing.pem", "", ""]),
        // A key where the CA bundle goes: no certificate, and the key is not shown.
        ("client.key", ["client.key", "", ""]),
        ("client.key", ["", "client.key", "client.key"]),
        ("ca.pem", ["", "client.pem", "ca.pem"]),
        // The key of another certificate.
        ("server.key", ["", "client.pem", "server.key"]),
    ];
    for (file, files) in cases {
        let error = start(files).expect_err(file);
        assert!(error.contains(file), "{file}: {error}");
        assert!(!error.contains(key_line) && !error.contains("BEGIN"), "{file}: {error}");
    }
    start(["ca.pem", "client.pem", "client.key"]).expect("the fixtures are usable");
}

#[test]
fn branch_tls_flags_and_config_file_keys_reach_the_configuration() {
    use clap::Parser as _;
    use kubetx::cli::{Cli, Command};
    let cli = Cli::try_parse_from([
        "kubetx",
        "operator",
        "--branch-ca-file",
        "/ca.pem",
        "--branch-client-cert-file",
        "/client.pem",
        "--branch-client-key-file",
        "/client.key",
    ])
    .expect("flags parse");
    let Some(Command::Operator(args)) = cli.command else {
        panic!("operator");
    };
    let config = args.serve.config().expect("config");
    assert_eq!(config.branch_ca_file, "/ca.pem");
    assert_eq!(config.branch_client_cert_file, "/client.pem");
    assert_eq!(config.branch_client_key_file, "/client.key");
    let yaml: Config = yaml_serde::from_str("branch_ca_file: /etc/ca.pem").expect("key parses");
    assert_eq!(yaml.branch_ca_file, "/etc/ca.pem");
}

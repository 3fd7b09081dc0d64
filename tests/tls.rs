//! TLS to PostgreSQL over TCP: `sslmode=require` works with the server's CA in PGSSLROOTCERT and is
//! refused without it (the certificate is verified).

mod common;
use common::*;
use std::process::Command;

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sslmode_require_verifies_the_server_certificate() {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let certs = base.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    sh(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(certs.join("server.key"))
        .arg("-out")
        .arg(certs.join("server.crt")));
    let root = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim() == "0";
    if root {
        sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&certs));
    }
    sh(Command::new("chmod").arg("600").arg(certs.join("server.key")));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (crt, key) = (certs.join("server.crt"), certs.join("server.key"));
    let settings = [
        "ssl=on".to_string(),
        format!("ssl_cert_file='{}'", crt.display()),
        format!("ssl_key_file='{}'", key.display()),
        "listen_addresses='127.0.0.1'".to_string(),
        format!("port={port}"),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let pgdata = base.join("pgdata");
    frostbyte_gitops::localpg::ensure(&pgdata, &settings).unwrap();

    let repo = TestRepo::new();
    let url = format!("postgres://postgres@localhost:{port}/postgres?sslmode=require");
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_CONTROL_DB_URL", &url).env("PGSSLROOTCERT", &crt).arg("migrate");
    let trusted = output(c);
    let mut c = command(repo.path(), None);
    c.env("FROSTBYTE_CONTROL_DB_URL", &url).env_remove("PGSSLROOTCERT").arg("migrate");
    let untrusted = output(c);
    frostbyte_gitops::localpg::stop(&pgdata).unwrap();
    let _ = std::fs::remove_dir_all(&base);

    assert_eq!(trusted.code, 0, "{}", trusted.all());
    assert!(trusted.stdout.contains("Applied migrations"), "{}", trusted.stdout);
    assert_eq!(untrusted.code, 1, "a self-signed certificate must not be accepted: {}", untrusted.all());
    assert!(untrusted.stderr.to_lowercase().contains("certificate"), "{}", untrusted.stderr);
}

#[test]
fn production_requires_tls_over_tcp_unless_the_url_says_otherwise() {
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("notls-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let settings = ["listen_addresses='127.0.0.1'".to_string(), format!("port={port}")];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let pgdata = base.join("pgdata");
    frostbyte_gitops::localpg::ensure(&pgdata, &settings).unwrap();

    let repo = TestRepo::new();
    let migrate = |url: &str, mode: &str| {
        let mut c = command(repo.path(), None);
        c.env("FROSTBYTE_CONTROL_DB_URL", url)
            .env("FROSTBYTE_MODE", mode)
            .env("FROSTBYTE_VERIFY_COMMITS", "off")
            .arg("migrate");
        output(c)
    };
    let plain = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let production = migrate(&plain, "production");
    let dev = migrate(&plain, "dev");
    let explicit = migrate(&format!("{plain}?sslmode=disable"), "production");
    // The word in a password, an application name or a conninfo value names no sslmode; `prefer`
    // would still hand the password to a server that declines TLS.
    let tricked: Vec<(String, Out)> = [
        format!("postgres://postgres:sslmode@127.0.0.1:{port}/postgres"),
        format!("{plain}?application_name=sslmode"),
        format!("{plain}?sslmode=prefer"),
        format!("host=127.0.0.1 port={port} user=postgres application_name='sslmode=disable'"),
    ]
    .into_iter()
    .map(|url| {
        let out = migrate(&url, "production");
        (url, out)
    })
    .collect();
    frostbyte_gitops::localpg::stop(&pgdata).unwrap();
    let _ = std::fs::remove_dir_all(&base);

    assert_eq!(production.code, 1, "production connected without TLS: {}", production.all());
    assert!(production.stderr.contains("TLS") || production.stderr.contains("SSL"), "{}", production.stderr);
    assert_eq!(dev.code, 0, "{}", dev.all());
    assert_eq!(explicit.code, 0, "an explicit sslmode is the operator's call: {}", explicit.all());
    for (url, out) in tricked {
        assert_eq!(out.code, 1, "{url}: production connected without TLS: {}", out.all());
        assert!(out.stderr.contains("TLS") || out.stderr.contains("SSL"), "{url}: {}", out.stderr);
    }
}

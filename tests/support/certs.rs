//! Test certificates made by `openssl` (installed by scripts/test.sh): CAs, server
//! certificates for given names, client certificates.

use std::path::Path;
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// A CA named `/CN=<stem>`: `<stem>.crt`, `<stem>.key`.
pub fn make_ca(dir: &Path, stem: &str) {
    let (crt, key, subject) = (
        format!("{stem}.crt"),
        format!("{stem}.key"),
        format!("/CN={stem}"),
    );
    let mut args = vec!["req", "-x509", "-noenc", "-days", "2"];
    args.extend(EC_KEY);
    args.extend([
        "-keyout",
        &key,
        "-out",
        &crt,
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args);
}

/// A server certificate `<stem>.crt` / `<stem>.key` for `names` (subjectAltName syntax),
/// signed by the CA `ca`.
pub fn make_server_cert(dir: &Path, stem: &str, ca: &str, names: &str) {
    make_signed_cert(
        dir,
        stem,
        ca,
        "/CN=slotstream test server",
        &format!(
            "subjectAltName={names}\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    );
}

/// A client certificate `<stem>.crt` / `<stem>.key` (`/CN=<stem>`, clientAuth), signed by the
/// CA `ca`.
pub fn make_client_cert(dir: &Path, stem: &str, ca: &str) {
    make_signed_cert(
        dir,
        stem,
        ca,
        &format!("/CN={stem}"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    );
}

/// `<stem>.crt` / `<stem>.key` with `subject` and the X.509 `extensions` (openssl's extfile
/// syntax), signed by the CA `ca`.
fn make_signed_cert(dir: &Path, stem: &str, ca: &str, subject: &str, extensions: &str) {
    let (crt, key, csr, ext) = (
        format!("{stem}.crt"),
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.ext"),
    );
    std::fs::write(dir.join(&ext), extensions).expect("write extensions");
    let mut args = vec!["req", "-noenc"];
    args.extend(EC_KEY);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
    openssl(dir, &args);
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-set_serial",
            "0x5107",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &ext,
        ],
    );
}

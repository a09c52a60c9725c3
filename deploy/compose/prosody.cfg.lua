-- Prosody serving fabrikam.test in deploy/compose.
run_as_root = true
pidfile = "/run/prosody/prosody.pid"
data_path = "/var/lib/prosody"
log = { { levels = { min = "info" }, to = "console" } }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "dialback" }
modules_disabled = { "posix" }
interfaces = { "*" }
certificates = "/etc/prosody/test/certs"
ssl = { cafile = "/etc/prosody/test/certs/ca.crt" }
-- Clients of this demo log in inside the network without TLS.
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
s2s_require_encryption = true
s2s_secure_auth = true
authentication = "internal_plain"
storage = "internal"
VirtualHost "fabrikam.test"

package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// testPKI writes a self-signed CA certificate, and a client certificate and
// key it signed, to dir; made per run, never committed.
func testPKI(t *testing.T, dir string) (ca, cert, key string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	clientKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	clientTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "imcloud"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	clientDER, err := x509.CreateCertificate(rand.Reader, clientTmpl, caTmpl, &clientKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(clientKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, cert, key = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key")
	writeFile(t, ca, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})))
	writeFile(t, cert, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: clientDER})))
	writeFile(t, key, string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})))
	return ca, cert, key
}

// TestRedisModes: each mode takes what it needs and refuses what belongs
// to another, naming the key.
func TestRedisModes(t *testing.T) {
	dir := t.TempDir()
	ca, cert, key := testPKI(t, dir)
	tests := []struct {
		name    string
		sets    []string
		wantErr string // "" = valid
	}{
		{name: "defaults: single on addr", sets: nil},
		{name: "single with credentials", sets: []string{"registry.redis.username=imcloud", "registry.redis.password=pw", "registry.redis.db=3"}},
		{name: "sentinel", sets: []string{"registry.redis.mode=sentinel", "registry.redis.addrs=10.0.0.1:26379, 10.0.0.2:26379", "registry.redis.master_name=imcloud",
			"registry.redis.sentinel_username=s", "registry.redis.sentinel_password=sp", "registry.redis.db=1"}},
		{name: "cluster", sets: []string{"registry.redis.mode=cluster", "registry.redis.addrs=10.0.0.1:7000"}},
		{name: "tls with the system's roots", sets: []string{"registry.redis.tls=true"}},
		{name: "tls with a CA, a client certificate and a name", sets: []string{"registry.redis.tls=true", "registry.redis.tls_ca_file=" + ca,
			"registry.redis.tls_cert_file=" + cert, "registry.redis.tls_key_file=" + key, "registry.redis.tls_server_name=redis.internal"}},

		{name: "unknown mode", sets: []string{"registry.redis.mode=replicated"}, wantErr: "registry.redis.mode"},
		{name: "mode in capitals", sets: []string{"registry.redis.mode=Cluster"}, wantErr: "registry.redis.mode"},
		{name: "empty mode", sets: []string{"registry.redis.mode="}, wantErr: "registry.redis.mode"},
		{name: "single without addr", sets: []string{"registry.redis.addr="}, wantErr: "registry.redis.addr"},
		{name: "single with a bad addr", sets: []string{"registry.redis.addr=redis"}, wantErr: "registry.redis.addr"},
		{name: "single with addrs", sets: []string{"registry.redis.addrs=10.0.0.1:7000"}, wantErr: "registry.redis.addrs"},
		{name: "single with a master name", sets: []string{"registry.redis.master_name=imcloud"}, wantErr: "registry.redis.master_name"},
		{name: "sentinel without addrs", sets: []string{"registry.redis.mode=sentinel", "registry.redis.master_name=imcloud"}, wantErr: "registry.redis.addrs"},
		{name: "sentinel without master name", sets: []string{"registry.redis.mode=sentinel", "registry.redis.addrs=10.0.0.1:26379"}, wantErr: "registry.redis.master_name"},
		{name: "sentinel with a bad address", sets: []string{"registry.redis.mode=sentinel", "registry.redis.addrs=10.0.0.1", "registry.redis.master_name=m"}, wantErr: "registry.redis.addrs"},
		{name: "cluster without addrs", sets: []string{"registry.redis.mode=cluster"}, wantErr: "registry.redis.addrs"},
		{name: "cluster on db 1", sets: []string{"registry.redis.mode=cluster", "registry.redis.addrs=10.0.0.1:7000", "registry.redis.db=1"}, wantErr: "registry.redis.db"},
		{name: "cluster with a master name", sets: []string{"registry.redis.mode=cluster", "registry.redis.addrs=10.0.0.1:7000", "registry.redis.master_name=m"}, wantErr: "registry.redis.master_name"},
		{name: "cluster with sentinel credentials", sets: []string{"registry.redis.mode=cluster", "registry.redis.addrs=10.0.0.1:7000", "registry.redis.sentinel_password=x"}, wantErr: "registry.redis.sentinel_password"},
		{name: "an address twice", sets: []string{"registry.redis.mode=cluster", "registry.redis.addrs=10.0.0.1:7000,10.0.0.1:7000"}, wantErr: "listed twice"},
		{name: "an empty address", sets: []string{"registry.redis.mode=cluster", "registry.redis.addrs=10.0.0.1:7000,,10.0.0.2:7000"}, wantErr: "registry.redis.addrs"},
		{name: "negative db", sets: []string{"registry.redis.db=-1"}, wantErr: "registry.redis.db"},
		{name: "sentinel waiting for its replica", sets: []string{"registry.redis.mode=sentinel", "registry.redis.addrs=10.0.0.1:26379", "registry.redis.master_name=m",
			"registry.redis.wait_replicas=1", "registry.redis.wait_timeout=500ms"}},
		{name: "negative wait_replicas", sets: []string{"registry.redis.wait_replicas=-1"}, wantErr: "registry.redis.wait_replicas"},
		{name: "too many wait_replicas", sets: []string{"registry.redis.wait_replicas=17"}, wantErr: "registry.redis.wait_replicas"},
		{name: "no wait_timeout", sets: []string{"registry.redis.wait_timeout=0s"}, wantErr: "registry.redis.wait_timeout"},
		{name: "a wait_timeout WAIT would take for 0 (for ever)", sets: []string{"registry.redis.wait_timeout=500us"}, wantErr: "registry.redis.wait_timeout"},
		{name: "a wait_timeout past any request", sets: []string{"registry.redis.wait_timeout=1m"}, wantErr: "registry.redis.wait_timeout"},

		{name: "tls files without tls", sets: []string{"registry.redis.tls_ca_file=" + ca}, wantErr: "registry.redis.tls"},
		{name: "server name without tls", sets: []string{"registry.redis.tls_server_name=redis.internal"}, wantErr: "registry.redis.tls"},
		{name: "certificate without key", sets: []string{"registry.redis.tls=true", "registry.redis.tls_cert_file=" + cert}, wantErr: "registry.redis.tls_cert_file"},
		{name: "key without certificate", sets: []string{"registry.redis.tls=true", "registry.redis.tls_key_file=" + key}, wantErr: "registry.redis.tls_cert_file"},
		{name: "tls not a bool", sets: []string{"registry.redis.tls=maybe"}, wantErr: "tls"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := Load(Sources{Sets: tt.sets, Defaults: withSecret})
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Load: %v", err)
				}
				if _, err := cfg.Registry.Redis.TLSConfig(); err != nil {
					t.Fatalf("TLSConfig of a valid configuration: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Load succeeded, want an error naming %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %q does not name %q", err, tt.wantErr)
			}
		})
	}
}

// TestRedisHostileValues: files that are not what their key says, and
// values meant to mislead, are refused at start-up with the key named, and
// the error does not echo a long value whole.
func TestRedisHostileValues(t *testing.T) {
	dir := t.TempDir()
	ca, cert, key := testPKI(t, dir)
	garbage := filepath.Join(dir, "garbage.pem")
	writeFile(t, garbage, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
	tlsOn := "registry.redis.tls=true"
	tests := []struct {
		name    string
		sets    []string
		wantErr string
	}{
		{"CA file missing", []string{tlsOn, "registry.redis.tls_ca_file=" + filepath.Join(dir, "nope.pem")}, "registry.redis.tls_ca_file"},
		{"CA file a directory", []string{tlsOn, "registry.redis.tls_ca_file=" + dir}, "registry.redis.tls_ca_file"},
		{"CA file garbage", []string{tlsOn, "registry.redis.tls_ca_file=" + garbage}, "registry.redis.tls_ca_file"},
		{"CA file a private key", []string{tlsOn, "registry.redis.tls_ca_file=" + key}, "registry.redis.tls_ca_file"},
		{"certificate file missing", []string{tlsOn, "registry.redis.tls_cert_file=" + filepath.Join(dir, "nope.pem"), "registry.redis.tls_key_file=" + key}, "registry.redis.tls_cert_file"},
		{"key file garbage", []string{tlsOn, "registry.redis.tls_cert_file=" + cert, "registry.redis.tls_key_file=" + garbage}, "registry.redis.tls_cert_file"},
		{"certificate and key swapped", []string{tlsOn, "registry.redis.tls_cert_file=" + key, "registry.redis.tls_key_file=" + cert}, "registry.redis.tls_cert_file"},
		{"key of another certificate", []string{tlsOn, "registry.redis.tls_cert_file=" + ca, "registry.redis.tls_key_file=" + key}, "registry.redis.tls_cert_file"},
		{"mode with a newline", []string{"registry.redis.mode=cluster\nsingle"}, "registry.redis.mode"},
		{"huge mode", []string{"registry.redis.mode=" + strings.Repeat("x", 1<<16)}, "registry.redis.mode"},
		{"prefix with a hash tag", []string{"registry.redis.prefix=imcloud:{a}:"}, "registry.redis.prefix"},
		{"prefix with an empty hash tag", []string{"registry.redis.prefix=imcloud{}"}, "registry.redis.prefix"},
		{"prefix with a control character", []string{"registry.redis.prefix=imcloud:\r\n"}, "registry.redis.prefix"},
		{"too many addresses", []string{"registry.redis.mode=cluster", "registry.redis.addrs=" + strings.Repeat("10.0.0.1:7000,", maxRedisAddrs) + "10.0.0.2:7000"}, "registry.redis.addrs"},
		{"address with a path", []string{"registry.redis.mode=cluster", "registry.redis.addrs=redis://10.0.0.1:7000/0"}, "registry.redis.addrs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(Sources{Sets: tt.sets, Defaults: withSecret})
			if err == nil {
				t.Fatalf("Load succeeded, want an error naming %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %q does not name %q", err, tt.wantErr)
			}
			if len(err.Error()) > 4096 {
				t.Fatalf("error of %d bytes: a hostile value is echoed whole", len(err.Error()))
			}
		})
	}
}

// TestRedisAddrErrorsHideCredentials: a URL where host:port belongs is
// refused without printing its password.
func TestRedisAddrErrorsHideCredentials(t *testing.T) {
	for _, sets := range [][]string{
		{"registry.redis.addr=redis://:hunter2-secret@10.0.0.1:6379"},
		{"registry.redis.mode=cluster", "registry.redis.addrs=redis://admin:hunter2-secret@10.0.0.1:7000"},
	} {
		_, err := Load(Sources{Sets: sets, Defaults: withSecret})
		if err == nil {
			t.Fatalf("%v: loaded", sets)
		}
		if strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "10.0.0.1") {
			t.Fatalf("%v: error %q shows the password, or not the host", sets, err)
		}
	}
}

// TestRedisTLSConfig: the files end up in the TLS configuration the client
// dials with, and none is made with tls off.
func TestRedisTLSConfig(t *testing.T) {
	ca, cert, key := testPKI(t, t.TempDir())
	r := Default().Registry.Redis
	if c, err := r.TLSConfig(); c != nil || err != nil {
		t.Fatalf("tls off: %v %v, want none", c, err)
	}
	r.TLS, r.TLSCAFile, r.TLSCertFile, r.TLSKeyFile, r.TLSServerName = true, ca, cert, key, "redis.internal"
	c, err := r.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	if c.RootCAs == nil || len(c.Certificates) != 1 || c.ServerName != "redis.internal" || c.MinVersion == 0 {
		t.Fatalf("TLS configuration %+v misses what was configured", c)
	}
	r.TLSCAFile, r.TLSCertFile, r.TLSKeyFile, r.TLSServerName = "", "", "", ""
	c, err = r.TLSConfig()
	if err != nil || c.RootCAs != nil || c.Certificates != nil || c.ServerName != "" {
		t.Fatalf("tls alone: %+v %v, want the system's roots and each address's host", c, err)
	}
}

// TestRedisDefaults: the default is today's single Redis on 127.0.0.1:6379.
func TestRedisDefaults(t *testing.T) {
	r := Default().Registry.Redis
	want := Redis{Mode: RedisSingle, Addr: "127.0.0.1:6379", Addrs: []string{}, Prefix: "imcloud:", WaitTimeout: time.Second}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("defaults %+v, want %+v", r, want)
	}
}

//go:build integration

package redis

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
)

// pki writes a CA, a server certificate for 127.0.0.1 and a client
// certificate, each signed by the CA, to dir; made per run, never
// committed. It returns the files by name: ca, server, server.key,
// client, client.key.
func pki(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	write := func(name, typ string, der []byte) {
		p := filepath.Join(dir, name+".pem")
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		files[name] = p
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "imcloud test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write("ca", "CERTIFICATE", der)
	for i, name := range []string{"server", "client"} {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		write(name, "CERTIFICATE", der)
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		write(name+".key", "EC PRIVATE KEY", kder)
	}
	return files
}

// TestIntegrationTLSAndACL: a Redis that speaks only TLS, asks for a
// client certificate and knows only an ACL user (the default user off),
// started here from Debian's redis-server: the configuration's TLS files
// and username reach it and the registry's contract holds over it; a
// client without its certificate, with another CA or with a wrong
// password is refused at start-up.
func TestIntegrationTLSAndACL(t *testing.T) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server not found (scripts/services.sh redis installs it): %v", err)
	}
	dir := t.TempDir()
	f := pki(t, dir)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	conf := filepath.Join(dir, "redis.conf")
	body := "port 0\ntls-port " + strconv.Itoa(port) + "\nbind 127.0.0.1\n" +
		"tls-cert-file " + f["server"] + "\ntls-key-file " + f["server.key"] + "\ntls-ca-cert-file " + f["ca"] + "\n" +
		"tls-auth-clients yes\nsave \"\"\nappendonly no\ndir " + dir + "\n" +
		"user default off\nuser imcloud on >s3cret-acl-password ~* &* +@all\n"
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, conf)
	out, err := os.Create(filepath.Join(dir, "redis.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); _ = out.Close() })

	good := config.Default().Registry.Redis
	good.Addr = "127.0.0.1:" + strconv.Itoa(port)
	good.Username, good.Password = "imcloud", "s3cret-acl-password"
	good.TLS, good.TLSCAFile, good.TLSCertFile, good.TLSKeyFile = true, f["ca"], f["client"], f["client.key"]

	open := func(cfg config.Redis) error {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		rdb, err := Connect(ctx, cfg)
		if err == nil {
			_ = rdb.Close()
		}
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for open(good) != nil {
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			t.Fatalf("the TLS Redis did not take the good configuration within 10s: %v\n%s", open(good), log)
		}
		time.Sleep(50 * time.Millisecond) // the server starting, with a deadline
	}

	noCert := good
	noCert.TLSCertFile, noCert.TLSKeyFile = "", ""
	otherCA := good
	otherCA.TLSCAFile = pki(t, t.TempDir())["ca"]
	wrongPassword := good
	wrongPassword.Password = "guess"
	defaultUser := good
	defaultUser.Username, defaultUser.Password = "", ""
	for name, cfg := range map[string]config.Redis{
		"no client certificate": noCert, "another CA": otherCA, "a wrong password": wrongPassword, "the default user": defaultUser,
	} {
		if err := open(cfg); err == nil {
			t.Errorf("%s: connected", name)
		} else if s := err.Error(); strings.Contains(s, "s3cret-acl-password") {
			t.Errorf("%s: the error shows the password: %s", name, s)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	rdb, err := Connect(ctx, good)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	registrytest.Run(t, func(t *testing.T, sessionTTL, nodeTTL time.Duration) pipeline.Registry {
		return NewRegistry(rdb, registrytest.Prefix(t), sessionTTL, nodeTTL)
	})
}

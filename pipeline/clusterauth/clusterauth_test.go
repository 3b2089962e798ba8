package clusterauth

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
)

const wait = 10 * time.Second

// serve runs a health service behind the cluster's server options and
// returns its address.
func serve(t *testing.T, c config.Cluster, log *logtest.Buffer) string {
	t.Helper()
	opts, err := ServerOptions(c, slog.New(slog.NewTextHandler(log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	healthpb.RegisterHealthServer(srv, health.NewServer())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return ln.Addr().String()
}

// call makes one unary and one streaming call as a client configured with c.
func call(t *testing.T, addr string, c config.Cluster) (unary, stream error) {
	t.Helper()
	opts, err := DialOptions(c)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	hc := healthpb.NewHealthClient(conn)
	_, unary = hc.Check(ctx, &healthpb.HealthCheckRequest{})
	st, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return unary, err
	}
	_, stream = st.Recv()
	return unary, stream
}

func TestSecret(t *testing.T) {
	const secret = "0123456789abcdef-cluster"
	var log logtest.Buffer
	addr := serve(t, config.Cluster{Secret: secret}, &log)
	tests := []struct {
		name   string
		client config.Cluster
		want   codes.Code
	}{
		{"no secret", config.Cluster{}, codes.Unauthenticated},
		{"wrong secret", config.Cluster{Secret: "0123456789abcdef-wrong!!"}, codes.Unauthenticated},
		{"prefix of the secret", config.Cluster{Secret: secret[:len(secret)-1]}, codes.Unauthenticated},
		{"right secret", config.Cluster{Secret: secret}, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			unary, stream := call(t, addr, tt.client)
			if got := status.Code(unary); got != tt.want {
				t.Errorf("unary call: %v, want %v", unary, tt.want)
			}
			if got := status.Code(stream); got != tt.want {
				t.Errorf("streaming call: %v, want %v", stream, tt.want)
			}
			if tt.want == codes.Unauthenticated && !strings.Contains(status.Convert(unary).Message(), "cluster.secret") {
				t.Errorf("refusal %q does not name cluster.secret", unary)
			}
		})
	}
}

// TestRefusalsLoggedOncePerPeer: a peer hammering the server without the
// secret costs one log line, not one per call.
func TestRefusalsLoggedOncePerPeer(t *testing.T) {
	var log logtest.Buffer
	addr := serve(t, config.Cluster{Secret: "0123456789abcdef"}, &log)
	for range 50 {
		if unary, _ := call(t, addr, config.Cluster{}); status.Code(unary) != codes.Unauthenticated {
			t.Fatalf("call without the secret: %v", unary)
		}
	}
	lines := strings.Count(log.String(), "refused an internal gRPC call")
	if lines != 1 {
		t.Fatalf("50 refused calls from one peer logged %d lines, want 1:\n%s", lines, log.String())
	}
	if !strings.Contains(log.String(), "peer=127.0.0.1") || !strings.Contains(log.String(), "secret missing") {
		t.Fatalf("log line lacks the peer or the reason:\n%s", log.String())
	}
}

// pki writes a CA and certificates it signs into a directory.
type pki struct {
	t    *testing.T
	dir  string
	name string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &pki{t: t, dir: t.TempDir(), name: name, cert: cert, key: key}
	p.write("ca.pem", "CERTIFICATE", der)
	return p
}

func (p *pki) write(name, typ string, der []byte) string {
	p.t.Helper()
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
	return path
}

// node issues a certificate for 127.0.0.1, usable as server and client,
// and returns the cluster configuration that uses it with trustCA.
func (p *pki) node(name string, trustCA *pki) config.Cluster {
	p.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		p.t.Fatal(err)
	}
	return config.Cluster{
		TLSCertFile: p.write(name+".pem", "CERTIFICATE", der),
		TLSKeyFile:  p.write(name+"-key.pem", "PRIVATE KEY", kder),
		TLSCAFile:   filepath.Join(trustCA.dir, "ca.pem"),
	}
}

// TestMutualTLS: the server admits only clients whose certificate the
// cluster CA signed, and clients trust only a server the CA signed.
func TestMutualTLS(t *testing.T) {
	ca, other := newCA(t, "cluster CA"), newCA(t, "another CA")
	var log logtest.Buffer
	addr := serve(t, ca.node("server", ca), &log)
	withSecret := ca.node("client-with-secret", ca)
	withSecret.Secret = "0123456789abcdef"

	tests := []struct {
		name   string
		client config.Cluster
		ok     bool
	}{
		{"client certificate from the cluster CA", ca.node("client", ca), true},
		{"certificate and a secret the server does not ask for", withSecret, true},
		{"client certificate from another CA", other.node("intruder", ca), false},
		{"client trusting another CA", ca.node("lost", other), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			unary, _ := call(t, addr, tt.client)
			if (unary == nil) != tt.ok {
				t.Fatalf("call: %v, want ok=%v", unary, tt.ok)
			}
		})
	}
	t.Run("client without a certificate", func(t *testing.T) {
		// Plaintext, and TLS with no client certificate.
		if unary, _ := call(t, addr, config.Cluster{}); unary == nil {
			t.Fatal("plaintext call accepted")
		}
		pool := x509.NewCertPool()
		pool.AddCert(ca.cert)
		noCert := credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(noCert))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil {
			t.Fatal("TLS call without a client certificate accepted")
		}
	})
}

func TestBadFiles(t *testing.T) {
	ca := newCA(t, "ca")
	good := ca.node("n", ca)
	notPEM := filepath.Join(t.TempDir(), "junk.pem")
	if err := os.WriteFile(notPEM, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		c    config.Cluster
		key  string
	}{
		{"missing certificate", config.Cluster{TLSCertFile: "/nonexistent.pem", TLSKeyFile: good.TLSKeyFile, TLSCAFile: good.TLSCAFile}, "cluster.tls_cert_file"},
		{"missing CA", config.Cluster{TLSCertFile: good.TLSCertFile, TLSKeyFile: good.TLSKeyFile, TLSCAFile: "/nonexistent.pem"}, "cluster.tls_ca_file"},
		{"CA not PEM", config.Cluster{TLSCertFile: good.TLSCertFile, TLSKeyFile: good.TLSKeyFile, TLSCAFile: notPEM}, "cluster.tls_ca_file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ServerOptions(tt.c, slog.Default()); err == nil || !strings.Contains(err.Error(), tt.key) {
				t.Errorf("ServerOptions: %v, want an error naming %s", err, tt.key)
			}
			if _, err := DialOptions(tt.c); err == nil || !strings.Contains(err.Error(), tt.key) {
				t.Errorf("DialOptions: %v, want an error naming %s", err, tt.key)
			}
		})
	}
}

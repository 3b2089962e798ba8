package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"imcloud/cmd/imcloud/internal/process"
	"imcloud/pipeline/clusterauth"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/stages/logic/token"
)

// rawConn is a gRPC connection as an attacker would open it: plaintext,
// sending secret in the metadata when it is not empty.
func rawConn(t *testing.T, addr, secret string) (*grpc.ClientConn, context.Context) {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	if secret != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, clusterauth.MetadataKey, secret)
	}
	return conn, ctx
}

// weighted is /im/nodes/weighted's data, as text.
func (h *harness) weighted() string {
	h.t.Helper()
	var data json.RawMessage
	if code := h.get("/im/nodes/weighted", &data); code != http.StatusOK {
		h.t.Fatalf("GET /im/nodes/weighted: %d", code)
	}
	return string(data)
}

// TestForgedInternalCalls: without the cluster secret, nobody who reaches
// cloud's or logic's gRPC can broadcast to every client, close a key or
// register a fake node; with it, the same calls work.
func TestForgedInternalCalls(t *testing.T) {
	h := start(t)
	c := h.connect("ws", token.Claims{Mid: 1, Key: "victim", Rooms: []string{"live://1"}})
	fake := &pb.NodeInfo{Id: "forged-node", GrpcAddr: "127.0.0.1:1", Host: "forged.example", WsPort: 1, Weight: 1000}

	// afterBroadcast, when set, runs between the broadcast and the close:
	// a broadcast is fanned out apart from the call, so a close right
	// behind it can reach the client first.
	forge := func(t *testing.T, secret string, afterBroadcast func()) (broadcast, closeKey, renew error) {
		cloudConn, ctx := rawConn(t, h.addrs.CloudGRPC, secret)
		cloud := pb.NewCloudClient(cloudConn)
		_, broadcast = cloud.Broadcast(ctx, &pb.BroadcastReq{Proto: &pb.Proto{Ver: 1, Op: 1000, Body: []byte("forged broadcast")}})
		if afterBroadcast != nil && broadcast == nil {
			afterBroadcast()
		}
		_, closeKey = cloud.Close(ctx, &pb.CloseReq{Key: "victim"})
		logicConn, ctx := rawConn(t, h.addrs.LogicGRPC, secret)
		_, renew = pb.NewLogicClient(logicConn).RenewOnline(ctx, &pb.RenewOnlineReq{Node: fake})
		return broadcast, closeKey, renew
	}
	for _, tt := range []struct{ name, secret string }{
		{"no secret", ""},
		{"wrong secret", "not-the-cluster-secret"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			broadcast, closeKey, renew := forge(t, tt.secret, nil)
			for name, err := range map[string]error{"Broadcast": broadcast, "Close": closeKey, "RenewOnline": renew} {
				if status.Code(err) != codes.Unauthenticated {
					t.Errorf("%s: %v, want Unauthenticated", name, err)
				}
			}
			// The client is still connected and received nothing before
			// the fence.
			fence := uniq("fence")
			h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"victim"}}, body: fence})
			expect(t, "client after forged calls", c, 1000, fence)
			if body := h.weighted(); strings.Contains(body, "forged.example") {
				t.Fatalf("/im/nodes/weighted lists the forged node: %s", body)
			}
		})
	}

	t.Run("the cluster secret", func(t *testing.T) {
		broadcast, closeKey, renew := forge(t, testClusterSecret, func() { expect(t, "client", c, 1000, "forged broadcast") })
		if broadcast != nil || closeKey != nil || renew != nil {
			t.Fatalf("calls with the secret: Broadcast %v, Close %v, RenewOnline %v", broadcast, closeKey, renew)
		}
		if err := expectClosed(t, "closed key", c); client.CloseCode(err) != 4009 {
			t.Fatalf("closed with %v, want 4009", err)
		}
		if body := h.weighted(); !strings.Contains(body, "forged.example") {
			t.Fatalf("/im/nodes/weighted does not list a node registered with the secret: %s", body)
		}
	})
}

// TestCloudNodeWithWrongSecretIsRefused: a cloud node that does not hold
// the cluster secret cannot register with logic, and says which key to fix.
func TestCloudNodeWithWrongSecretIsRefused(t *testing.T) {
	a := start(t)
	cfg, err := config.Load(config.Sources{Sets: []string{
		"stages=cloud", "broker.kind=gochannel", "cloud.logic_addr=" + a.addrs.LogicGRPC,
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0",
		"cluster.secret=another-cluster-secret",
	}})
	if err != nil {
		t.Fatal(err)
	}
	n, err := process.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelError})))
	if err == nil {
		_ = n.Shutdown(context.Background())
		t.Fatal("a cloud node with the wrong cluster secret started")
	}
	if !strings.Contains(err.Error(), "cluster.secret") {
		t.Fatalf("error %q does not name cluster.secret", err)
	}
}

// TestStartRefusesExposedBinds: process.Start applies the bind rules to a
// configuration built in code, before it binds anything.
func TestStartRefusesExposedBinds(t *testing.T) {
	base, err := config.Load(config.Sources{Sets: []string{
		"broker.kind=gochannel", "logic.auth.jwt_secret=s",
		"logic.http_addr=127.0.0.1:0", "logic.grpc_addr=127.0.0.1:0",
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0",
	}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		mutate func(*config.Config)
		key    string
	}{
		{"logic grpc on every interface", func(c *config.Config) { c.Logic.GRPCAddr = ":0" }, "logic.grpc_addr"},
		{"cloud grpc on every interface", func(c *config.Config) { c.Cloud.GRPCAddr = "0.0.0.0:0" }, "cloud.grpc_addr"},
		{"push API on every interface without keys", func(c *config.Config) { c.Logic.HTTPAddr = ":0" }, "logic.api_keys"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.mutate(&cfg)
			n, err := process.Start(context.Background(), cfg, slog.New(slog.DiscardHandler))
			if err == nil {
				_ = n.Shutdown(context.Background())
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), tt.key) {
				t.Fatalf("error %q does not name %s", err, tt.key)
			}
		})
	}
}

// TestAdminDoesNotServeCmdline: the command line holds --set secrets; the
// admin listener serves the profiles but not it.
func TestAdminDoesNotServeCmdline(t *testing.T) {
	h := start(t, "admin.addr=127.0.0.1:0")
	for _, tt := range []struct {
		path string
		want int
	}{
		{"/debug/pprof/cmdline", http.StatusNotFound},
		{"/debug/pprof/", http.StatusOK},
		{"/debug/pprof/goroutine?debug=1", http.StatusOK},
		{"/debug/pprof/symbol", http.StatusOK},
		{"/livez", http.StatusOK},
	} {
		resp, err := http.Get("http://" + h.addrs.Admin + tt.path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("GET %s: %d, want %d", tt.path, resp.StatusCode, tt.want)
		}
		if tt.path == "/debug/pprof/cmdline" && strings.Contains(string(b), os.Args[0]) {
			t.Errorf("GET %s shows the command line: %s", tt.path, b)
		}
	}
}

// testCA issues certificates for 127.0.0.1 signed by one CA.
type testCA struct {
	t    *testing.T
	dir  string
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	ca := &testCA{t: t, dir: t.TempDir()}
	ca.cert, ca.key = ca.issue("ca")
	return ca
}

// issue signs a certificate (self-signed when ca.cert is nil, as the CA)
// and writes it and its key as name.pem and name-key.pem.
func (ca *testCA) issue(name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t := ca.t
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	parent, signer := tmpl, key
	if ca.cert == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage = true, true, x509.KeyUsageCertSign
	} else {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		parent, signer = ca.cert, ca.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	ca.write(name+".pem", "CERTIFICATE", der)
	ca.write(name+"-key.pem", "PRIVATE KEY", kder)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func (ca *testCA) write(name, typ string, der []byte) {
	ca.t.Helper()
	if err := os.WriteFile(filepath.Join(ca.dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		ca.t.Fatal(err)
	}
}

// sets are the --set lines of a node using the certificate name, issued
// on first use, and trusting this CA.
func (ca *testCA) sets(name string) []string {
	if _, err := os.Stat(filepath.Join(ca.dir, name+".pem")); err != nil {
		ca.issue(name)
	}
	return []string{
		"cluster.tls_cert_file=" + filepath.Join(ca.dir, name+".pem"),
		"cluster.tls_key_file=" + filepath.Join(ca.dir, name+"-key.pem"),
		"cluster.tls_ca_file=" + filepath.Join(ca.dir, "ca.pem"),
	}
}

// TestMutualTLSCluster: with cluster.tls_* every internal call (cloud
// registering with logic, job delivering to cloud, logic closing a key on
// another node) runs over mutual TLS, and a node whose certificate another
// CA signed is refused.
func TestMutualTLSCluster(t *testing.T) {
	ca := newTestCA(t)
	a := start(t, ca.sets("a")...)
	b := start(t, append(ca.sets("b"), "stages=cloud", "cloud.logic_addr="+a.addrs.LogicGRPC)...)

	onB := b.connect("ws", token.Claims{Mid: 1, Key: "mtls"})
	body := uniq("over mutual TLS")
	a.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"mtls"}}, body: body})
	expect(t, "client on node b", onB, 1000, body)
	a.connect("tcp", token.Claims{Mid: 1, Key: "mtls"})
	if err := expectClosed(t, "connection on node b", onB); client.CloseCode(err) != 4009 {
		t.Fatalf("connection on node b closed with %v, want 4009 from logic over mutual TLS", err)
	}

	// A plaintext caller, even with the secret, gets no answer.
	conn, ctx := rawConn(t, a.addrs.CloudGRPC, testClusterSecret)
	if _, err := pb.NewCloudClient(conn).Broadcast(ctx, &pb.BroadcastReq{Proto: &pb.Proto{Ver: 1, Op: 1000, Body: []byte("x")}}); err == nil {
		t.Fatal("plaintext Broadcast accepted by a mutual TLS server")
	}

	other := newTestCA(t)
	cfg, err := config.Load(config.Sources{Sets: append(other.sets("intruder"),
		"stages=cloud", "broker.kind=gochannel", "cloud.logic_addr="+a.addrs.LogicGRPC,
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0")})
	if err != nil {
		t.Fatal(err)
	}
	if n, err := process.Start(context.Background(), cfg, slog.New(slog.DiscardHandler)); err == nil {
		_ = n.Shutdown(context.Background())
		t.Fatal("a cloud node with a certificate from another CA registered")
	}
}

// TestJobWithWrongSecretIsRefused: on main a job without the cluster secret
// started cleanly, then every message it took was refused by the cloud
// nodes, retried and poisoned. Now it pings the cloud nodes it knows at
// start-up and refuses to start, naming the key.
func TestJobWithWrongSecretIsRefused(t *testing.T) {
	a := start(t)
	for _, tt := range []struct{ name, secret string }{
		{"no secret", ""},
		{"wrong secret", "another-cluster-secret"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := config.Load(config.Sources{Sets: []string{
				"stages=job", "broker.kind=gochannel", "job.cloud_addrs=" + a.addrs.CloudGRPC,
				"cluster.secret=" + tt.secret,
			}})
			if err != nil {
				t.Fatal(err)
			}
			n, err := process.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelError})))
			if err == nil {
				_ = n.Shutdown(context.Background())
				t.Fatal("a job with the wrong cluster secret started")
			}
			if !strings.Contains(err.Error(), "cluster.secret") {
				t.Fatalf("error %q does not name cluster.secret", err)
			}
		})
	}
	t.Run("right secret", func(t *testing.T) {
		cfg, err := config.Load(config.Sources{Sets: []string{
			"stages=job", "broker.kind=gochannel", "job.cloud_addrs=" + a.addrs.CloudGRPC,
			"cluster.secret=" + testClusterSecret,
		}})
		if err != nil {
			t.Fatal(err)
		}
		n, err := process.Start(context.Background(), cfg, slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelError})))
		if err != nil {
			t.Fatal(err)
		}
		_ = n.Shutdown(context.Background())
	})
}

package process

import (
	"context"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"imcloud/pipeline/clusterauth"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"imcloud/pipeline/config"
)

// TestReadyz: /readyz lists each dependency of the stages the process
// runs and answers 200 when all are in order; a cloud node that drains
// turns it 503, naming the node as draining, while the admin listener
// still answers.
func TestReadyz(t *testing.T) {
	p := startForReadyz(t)
	body := readyzUntil(t, p, http.StatusOK, "")
	for _, want := range []string{"cloud: ok", "job: ok", "registry: ok"} {
		if !strings.Contains(body, want) {
			t.Errorf("/readyz does not say %q:\n%s", want, body)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Both gRPC ports answer the standard health check, to a caller with
	// the cluster secret (grpc_health_probe -rpc-header), and to none
	// without it.
	dial, err := clusterauth.DialOptions(p.cfg.Cluster)
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{p.Addrs().CloudGRPC, p.Addrs().LogicGRPC} {
		bare, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		_, err = healthpb.NewHealthClient(bare).Check(ctx, &healthpb.HealthCheckRequest{})
		bare.Close()
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("health check on %s without the secret: %v, want Unauthenticated", addr, err)
		}
		conn, err := grpc.NewClient(addr, dial...)
		if err != nil {
			t.Fatal(err)
		}
		r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		conn.Close()
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health check on %s: %v %v", addr, r, err)
		}
	}
	if err := p.cloudStage.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if body := readyzUntil(t, p, http.StatusServiceUnavailable, "cloud: draining"); !strings.Contains(body, "job: ok") {
		t.Fatalf("a draining node:\n%s", body)
	}
}

// startForReadyz starts a process on the embedded broker with sets over
// loopback defaults.
func startForReadyz(t *testing.T, sets ...string) *Process {
	t.Helper()
	cfg, err := config.Load(config.Sources{Sets: append([]string{
		"broker.kind=gochannel", "registry.kind=memory",
		"logic.http_addr=127.0.0.1:0", "logic.grpc_addr=127.0.0.1:0",
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0",
		"admin.addr=127.0.0.1:0", "logic.auth.jwt_secret=readyz-secret", "logic.api_keys=readyz-api-key-0123456789",
		"cluster.secret=readyz-cluster-secret-0123456789",
	}, sets...)})
	if err != nil {
		t.Fatal(err)
	}
	p, err := Start(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return p
}

// readyzUntil polls /readyz until it answers code holding want, or fails.
func readyzUntil(t *testing.T, p *Process, code int, want string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		res, err := http.Get("http://" + p.Addrs().Admin + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode == code && strings.Contains(string(b), want) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz: %d\n%s\nwant %d with %q", res.StatusCode, b, code, want)
		}
		time.Sleep(20 * time.Millisecond) // polling the probe, with a deadline
	}
}

// TestCanary: job's canary reaches the cloud node through the push topic
// (its age and lag are metrics); a node no canary reaches — here no job
// runs — turns not ready within three intervals, naming the canary.
func TestCanary(t *testing.T) {
	p := startForReadyz(t, "job.canary_interval=100ms", "cloud.canary_timeout=300ms")
	readyzUntil(t, p, http.StatusOK, "canary: ok")
	deadline := time.Now().Add(10 * time.Second)
	for {
		age, lag := p.cloudStage.Canary()
		if lag > 0 && age < time.Second {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no canary arrived: age %s, lag %s", age, lag)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
	res, err := http.Get("http://" + p.Addrs().Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(res.Body)
	res.Body.Close()
	for _, name := range []string{"imcloud_canary_age_seconds ", "imcloud_canary_lag_seconds "} {
		if !strings.Contains(string(b), "\n"+name) {
			t.Errorf("/metrics has no %s", name)
		}
	}

	nojob := startForReadyz(t, "stages=logic,cloud", "job.canary_interval=100ms", "cloud.canary_timeout=300ms")
	body := readyzUntil(t, nojob, http.StatusServiceUnavailable, "canary: no job canary")
	if !strings.Contains(body, "cloud: ok") {
		t.Fatalf("the other checks: %s", body)
	}
}

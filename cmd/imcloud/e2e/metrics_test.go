package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"imcloud/pipeline"
	"imcloud/proto/pb"
	"net"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// metricFamilies reads the process's /metrics, parsed.
func metricFamilies(t *testing.T, admin string) map[string]*dto.MetricFamily {
	t.Helper()
	res, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(res.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return families
}

// scrape reads the process's /metrics: each sample by its name and
// labels, e.g. `imcloud_cloud_closes_total{code="4008"}`.
func scrape(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	families := metricFamilies(t, admin)
	out := map[string]float64{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			key := name
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				out[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[key] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				out[key+"_count"] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

// TestMetricsOfAScriptedSession: after a scripted session — two clients,
// a refused token, pushes to a key and two rooms, a client closed as a
// slow consumer, a push to an offline key poisoned, a client message —
// each counter on /metrics moved by exactly what the session did.
func TestMetricsOfAScriptedSession(t *testing.T) {
	// Small socket buffers on both sides: a client that stops reading
	// fills its queue after a few kilobytes.
	h := start(t, "admin.addr=127.0.0.1:0", "cloud.send_queue=16", "cloud.sndbuf=4096", "job.offline_grace=0s")
	admin := h.addrs.Admin
	a := h.connect("ws", token.Claims{Mid: 1, Key: "a", Rooms: []string{"live://m"}})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	slow, err := client.Dial(ctx, h.addrs.CloudTCP, client.Options{Dialer: &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) }); err != nil {
			return err
		}
		return serr
	}}})
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	if _, err := slow.Auth([]byte(h.token(token.Claims{Mid: 2, Key: "b", Rooms: []string{"live://slow"}}, time.Hour))); err != nil {
		t.Fatal(err)
	}
	// A refused token: no connection, one handshake failure.
	bad := h.dial("ws")
	if _, err := bad.Auth([]byte("not a token")); err == nil {
		t.Fatal("a bad token was accepted")
	}

	read := func(c *client.Conn, want string) {
		t.Helper()
		for {
			p, err := c.Read()
			if err != nil {
				t.Fatalf("waiting for %q: %v", want, err)
			}
			if p.Op >= wire.MinBusinessOp && string(p.Body) == want {
				return
			}
		}
	}
	push := func(path string, q url.Values, body string) {
		t.Helper()
		q.Set("operation", "1000")
		h.push(request{path: path, query: q, body: body})
	}
	push("/im/push/keys", url.Values{"keys": {"a"}}, "to a")
	read(a, "to a")
	push("/im/push/room", url.Values{"type": {"live"}, "room": {"m"}}, "to m")
	read(a, "to m")
	// The slow client reads nothing: 40 room pushes of 2 KB overflow its
	// 16-packet queue behind 4 KB socket buffers.
	const flood = 40
	big := strings.Repeat("x", 2000)
	for i := range flood {
		push("/im/push/room", url.Values{"type": {"live"}, "room": {"slow"}}, fmt.Sprint(i, big))
	}
	// Refused at accept (no such key): counted by logic, never published.
	push("/im/push/keys", url.Values{"keys": {"gone"}}, "to nobody")
	// Published for a node that is gone: job gives up on it as offline
	// (job.offline_grace 0) and poisons it.
	msg, err := pipeline.NewPushMessage("metrics-poison", "metrics-poison", &pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: 1000, Server: "gone", Keys: []string{"k-gone"}, Msg: []byte("x")})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.node.Broker().Publisher.Publish(h.cfg.Topics.Push, msg); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Send(wire.OpSendMsg, []byte("up")); err != nil {
		t.Fatal(err)
	}

	want := map[string]float64{
		`imcloud_cloud_connects_total`:                                     2,
		`imcloud_cloud_connections{transport="ws"}`:                        1,
		`imcloud_cloud_connections{transport="tcp"}`:                       0,
		`imcloud_cloud_closes_total{code="4008"}`:                          1,
		`imcloud_cloud_slow_consumer_closes_total`:                         1,
		`imcloud_cloud_handshake_failures_total{reason="unauthenticated"}`: 1,
		`imcloud_cloud_upstream_messages_total`:                            1,
		`imcloud_logic_pushes_total{code="200",route="keys"}`:              2,
		`imcloud_logic_pushes_total{code="200",route="room"}`:              1 + flood,
		`imcloud_job_deliveries_total{result="delivered"}`:                 2 + flood,
		`imcloud_job_deliveries_total{result="offline"}`:                   1,
		`imcloud_poison_messages`:                                          1,
		`imcloud_job_deliveries_total{result="duplicate"}`:                 0,
		`imcloud_delivery_latency_seconds{kind="room"}_count`:              1 + flood,
		`imcloud_delivery_latency_seconds{kind="user"}_count`:              1,
		`imcloud_logic_publish_seconds_count`:                              2 + flood,
	}
	var got map[string]float64
	deadline := time.Now().Add(wait)
	for {
		got = scrape(t, admin)
		done := true
		for k, v := range want {
			if got[k] != v {
				done = false
			}
		}
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // polling the scrape, with a deadline
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
	// The libraries' collectors are there too.
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes", "imcloud_cloud_fanout_rounds_total", "imcloud_cloud_packets_per_write_count"} {
		if _, ok := got[name]; !ok {
			t.Errorf("no %s", name)
		}
	}
	var grpcHandled float64
	for k, v := range got {
		if strings.HasPrefix(k, "grpc_server_handled_total{") && strings.Contains(k, `grpc_method="PushMsg"`) {
			grpcHandled += v
		}
	}
	if grpcHandled < 1 {
		t.Error("no gRPC server metrics for PushMsg")
	}
	checkDashboard(t, admin)
	for k := range got {
		for _, leak := range []string{"live://", `"a"`, "gone"} {
			if strings.Contains(k, leak) {
				t.Errorf("a label holds client input: %s", k)
			}
		}
	}
}

// checkDashboard: every metric deploy/grafana/imcloud.json queries is one
// the process serves (a histogram's _bucket, _sum and _count by its name).
func checkDashboard(t *testing.T, admin string) {
	t.Helper()
	b, err := os.ReadFile("../../../deploy/grafana/imcloud.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("the dashboard does not parse: %v", err)
	}
	families := metricFamilies(t, admin)
	served := func(name string) bool {
		if _, ok := families[name]; ok {
			return true
		}
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if f, ok := families[strings.TrimSuffix(name, suffix)]; ok && strings.HasSuffix(name, suffix) && f.GetType() == dto.MetricType_HISTOGRAM {
				return true
			}
		}
		return false
	}
	ident := regexp.MustCompile(`\b(imcloud|go|process|grpc)_[a-z0-9_]+\b`)
	// Label names (by (…), without (…), {…}) are not metrics.
	labels := regexp.MustCompile(`(by|without)\s*\([^)]*\)|\{[^}]*\}`)
	n := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, name := range ident.FindAllString(labels.ReplaceAllString(tg.Expr, ""), -1) {
				n++
				if !served(name) {
					t.Errorf("dashboard panel %q queries %s, which /metrics does not serve", p.Title, name)
				}
			}
		}
	}
	if n == 0 {
		t.Error("the dashboard queries no metric")
	}
}

package cloud

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
)

// pacedReq is a paced broadcast of body, its message id id.
func pacedReq(id, body string, speed int32) *pb.BroadcastReq {
	return &pb.BroadcastReq{Proto: &pb.Proto{Op: 1000, Id: id, Body: []byte(body)}, Speed: speed}
}

// connectMany connects n quiet TCP clients, mids from first.
func connectMany(t *testing.T, nd *node, n int, first int64) []*client.Conn {
	t.Helper()
	cs := make([]*client.Conn, n)
	for i := range cs {
		cs[i] = nd.connect(t, "tcp", claims{Mid: first + int64(i), Key: fmt.Sprint("paced-", first+int64(i))})
	}
	return cs
}

// At most cloud.max_paced_broadcasts run at once; one more is refused
// with RESOURCE_EXHAUSTED and not remembered as delivered, so that job's
// retry goes through once a slot is free. A paced broadcast whose clients
// have all gone ends then, not when its pace would have. On main 4773376
// every paced broadcast ran, uncounted, for connections/speed + 10 s.
func TestPacedBroadcastCap(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.MaxPacedBroadcasts = 2; c.MaxPacedDuration = time.Hour })
	// 20 clients at speed 1: each broadcast would take 19 s.
	clients := connectMany(t, n, 20, 1)
	for _, id := range []string{"a", "b"} {
		if r, err := n.rpc.Broadcast(context.Background(), pacedReq(id, id, 1)); err != nil || r.Delivered != 20 {
			t.Fatalf("paced broadcast %s: %+v, %v", id, r, err)
		}
	}
	_, err := n.rpc.Broadcast(context.Background(), pacedReq("c", "c", 1))
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third paced broadcast over a cap of 2: %v, want ResourceExhausted", err)
	}
	if got := n.st.pacedRunning(); got != 2 {
		t.Fatalf("%d paced broadcasts running, want 2", got)
	}

	// The clients leave: the broadcasts have no one left to wait for.
	for _, c := range clients {
		_ = c.Close()
	}
	waitFor(t, "the paced broadcasts to end with their clients gone", func() bool { return n.st.pacedRunning() == 0 })

	// job's retry of the refused broadcast is delivered, not taken for a
	// duplicate.
	late := n.connect(t, "tcp", claims{Mid: 100, Key: "late"})
	if r, err := n.rpc.Broadcast(context.Background(), pacedReq("c", "c", 1)); err != nil || r.Delivered != 1 {
		t.Fatalf("retried paced broadcast: %+v, %v", r, err)
	}
	if p, err := late.Read(); err != nil || string(p.Body) != "c" {
		t.Fatalf("late client read %+v, %v", p, err)
	}
}

// A speed too low for the node's connections is raised so that the
// broadcast ends within cloud.max_paced_duration: 30 clients at speed 1
// under a 1 s bound all get the message in about a second, not 29 s.
func TestPacedBroadcastDurationBound(t *testing.T) {
	const clients = 30
	n := startNode(t, func(c *config.Cloud) { c.MaxPacedDuration = time.Second })
	cs := connectMany(t, n, clients, 1)
	start := time.Now()
	if r, err := n.rpc.Broadcast(context.Background(), pacedReq("slow", "slow", 1)); err != nil || r.Delivered != clients {
		t.Fatalf("paced broadcast: %+v, %v", r, err)
	}
	for i, c := range cs {
		_ = c.SetReadDeadline(start.Add(10 * time.Second))
		if p, err := c.Read(); err != nil || string(p.Body) != "slow" {
			t.Fatalf("client %d after %v: %+v, %v", i, time.Since(start), p, err)
		}
	}
	// A second is the bound; the rest is slack for a loaded machine.
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("paced broadcast took %v, bound 1s", took)
	}
	waitFor(t, "the paced broadcast to end", func() bool { return n.st.pacedRunning() == 0 })
}

// Draining the node stops its paced broadcasts, and refuses new ones.
func TestPacedBroadcastStopsOnDrain(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.MaxPacedDuration = time.Hour })
	connectMany(t, n, 20, 1)
	if _, err := n.rpc.Broadcast(context.Background(), pacedReq("long", "long", 1)); err != nil {
		t.Fatal(err)
	}
	// Under way, with 19 s of pace to go.
	if got := n.st.pacedRunning(); got != 1 {
		t.Fatalf("%d paced broadcasts running, want 1", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := n.st.Drain(ctx); err != nil {
		t.Fatalf("drain with a paced broadcast running: %v", err)
	}
	if got := n.st.pacedRunning(); got != 0 {
		t.Fatalf("%d paced broadcasts still running after drain", got)
	}
	_, err := n.rpc.Broadcast(context.Background(), pacedReq("after", "after", 1))
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("paced broadcast while draining: %v, want Unavailable", err)
	}
}

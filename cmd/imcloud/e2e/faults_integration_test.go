//go:build integration

package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"imcloud/adapters"
	"imcloud/pipeline"
	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// pushConcurrently sends n key pushes with bodies prefix-0…prefix-(n-1)
// from workers and returns the bodies that got 200.
func pushConcurrently(t *testing.T, h *harness, n, workers int, prefix string, keys ...string) []string {
	t.Helper()
	var (
		mu sync.Mutex
		ok []string
		wg sync.WaitGroup
	)
	next := make(chan int)
	go func() {
		for i := range n {
			next <- i
		}
		close(next)
	}()
	for range workers {
		wg.Go(func() {
			for i := range next {
				body := fmt.Sprintf("%s-%d", prefix, i)
				code, _ := h.do(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": keys}, body: body})
				if code == 200 {
					mu.Lock()
					ok = append(ok, body)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return ok
}

// collect reads from c until every body in want arrived, failing after
// wait; it returns how often each body arrived.
func collect(t *testing.T, name string, c *client.Conn, want []string) map[string]int {
	t.Helper()
	got := map[string]int{}
	missing := len(want)
	wanted := map[string]bool{}
	for _, b := range want {
		wanted[b] = true
	}
	for missing > 0 {
		_ = c.SetReadDeadline(time.Now().Add(wait))
		p, err := c.Read()
		if err != nil {
			t.Fatalf("%s: %d of %d messages missing: %v", name, missing, len(want), err)
		}
		b := string(p.Body)
		got[b]++
		if wanted[b] && got[b] == 1 {
			missing--
		}
	}
	return got
}

// TestIntegrationTenThousandPushes: 10,000 pushes through RabbitMQ reach
// a WebSocket and a TCP client, none lost, none twice.
func TestIntegrationTenThousandPushes(t *testing.T) {
	h := start(t, amqpTopics(t)...)
	ws := h.connect("ws", token.Claims{Mid: 1, Key: "tenk-ws"})
	tcp := h.connect("tcp", token.Claims{Mid: 2, Key: "tenk-tcp"})
	ok := pushConcurrently(t, h, 10_000, 32, "tenk", "tenk-ws", "tenk-tcp")
	if len(ok) != 10_000 {
		t.Fatalf("%d of 10,000 pushes got 200", len(ok))
	}
	for name, c := range map[string]*client.Conn{"ws": ws, "tcp": tcp} {
		got := collect(t, name, c, ok)
		for b, n := range got {
			if n != 1 {
				t.Errorf("%s: %q arrived %d times", name, b, n)
			}
		}
		if len(got) != len(ok) {
			t.Errorf("%s: %d distinct messages, want %d", name, len(got), len(ok))
		}
	}
}

// freeAddr returns a loopback address nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestIntegrationUnreachableCloudIsPoisonedThenReplayed: a room push while a
// cloud node is down is retried, then poisoned with the reason; replayed
// after the node is back, it reaches that node's clients, and only them.
// It runs without streams (history.enabled=false): with them the replayed
// push keeps its room position, which a client joining after it was
// accepted starts past — it recovers it (op 21) or reads it with GET
// /im/history, not live (README, Delivery).
func TestIntegrationUnreachableCloudIsPoisonedThenReplayed(t *testing.T) {
	topics := append(amqpTopics(t), "history.enabled=false")
	a := start(t, append(topics, "job.retry.max_retries=2", "job.retry.initial_interval=10ms")...)
	bAddr := freeAddr(t)
	bSets := append(topics, "stages=cloud", "cloud.grpc_addr="+bAddr, "cloud.logic_addr="+a.addrs.LogicGRPC)
	b := start(t, bSets...)
	onA := a.connect("ws", token.Claims{Mid: 1, Rooms: []string{"live://p"}})
	// b hosts the room too when it goes down, so the push is routed to it.
	b.connect("tcp", token.Claims{Mid: 3, Rooms: []string{"live://p"}})

	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := b.node.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	body := uniq("while b was down")
	a.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"p"}}, body: body})
	expect(t, "client on the live node", onA, 1000, body)

	cfg := a.cfg
	p, err := adapters.OpenPoison(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	var poisoned []pipeline.Poisoned
	for deadline := time.Now().Add(wait); len(poisoned) == 0; time.Sleep(20 * time.Millisecond) {
		if poisoned, _, err = p.List(ctx, "", 1000); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("nothing poisoned")
		}
	}
	if len(poisoned) != 1 || !strings.Contains(poisoned[0].Metadata.Get(middleware.ReasonForPoisonedKey), bAddr) {
		t.Fatalf("poisoned %d messages, first %+v; want one naming %s", len(poisoned), poisoned, bAddr)
	}

	b2 := start(t, bSets...)
	onB := b2.connect("tcp", token.Claims{Mid: 2, Rooms: []string{"live://p"}})
	if n, err := p.Replay(ctx, pipeline.IDs(poisoned[0].ID)); err != nil || n.Total() != 1 {
		t.Fatalf("replay: %v, %v", n, err)
	}
	expect(t, "client on the node that came back", onB, 1000, body)
	fence := uniq("fence")
	a.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"p"}}, body: fence})
	expect(t, "client on the live node (must not get the replay)", onA, 1000, fence)
	if left, _, _ := p.List(ctx, "", 1000); len(left) != 0 {
		t.Fatalf("%d messages still poisoned after the replay", len(left))
	}
}

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// connectRecover dials over ws, keeping positions in ps, and authenticates
// with claims (which opt in).
func (h *harness) connectRecover(claims token.Claims, ps *client.Positions) (*client.Conn, client.AuthReply) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := client.Dial(ctx, "ws://"+h.addrs.CloudWS+"/sub", client.Options{Positions: ps})
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = c.Close() })
	_ = c.SetReadDeadline(time.Now().Add(wait))
	r, err := c.Auth([]byte(h.token(claims, time.Hour)))
	if err != nil {
		h.t.Fatalf("auth: %v", err)
	}
	return c, r
}

// streamReader checks, per stream, that positions come each once and in
// order, and that each body is the one pushed at that position.
type streamReader struct {
	t    *testing.T
	c    *client.Conn
	next map[string]uint64              // the next position expected
	body map[string]func(uint64) string // the body pushed at a position
}

// read reads until every stream in until reached its position.
func (r *streamReader) read(until map[string]uint64) {
	r.t.Helper()
	_ = r.c.SetReadDeadline(time.Now().Add(2 * wait))
	done := func() bool {
		for s, p := range until {
			if r.next[s] <= p {
				return false
			}
		}
		return true
	}
	for !done() {
		m, err := r.c.ReadMessage()
		if err != nil {
			r.t.Fatalf("read: %v (next positions %v, want through %v)", err, r.next, until)
		}
		if m.Stream == "" {
			continue
		}
		want, ok := r.next[m.Stream]
		if !ok {
			r.t.Fatalf("message of unexpected stream %s@%d", m.Stream, m.Pos)
		}
		if m.Pos != want || m.Gap || m.Dup {
			r.t.Fatalf("%s: position %d (gap %v, dup %v), want %d", m.Stream, m.Pos, m.Gap, m.Dup, want)
		}
		if b := r.body[m.Stream](m.Pos); string(m.Body) != b {
			r.t.Fatalf("%s@%d: body %q, want %q", m.Stream, m.Pos, m.Body, b)
		}
		r.next[m.Stream]++
	}
}

// TestRecoverAfterReconnect is issue 12's first "What to show": a client
// that opted in disconnects; 100 pushes to its room and 100 to its user
// go out; it reconnects with its positions and receives all 200 in order,
// then live ones, while pushes go on during the reconnect — no gap and no
// duplicate at the seam. A room whose history kept too little answers
// "trimmed", with where live messages continue.
func TestRecoverAfterReconnect(t *testing.T) {
	h := start(t, "history.rooms.live.size=2000", "history.rooms.live.ttl=5m", "history.rooms.small.size=5", "history.rooms.small.ttl=5m", "job.concurrency=8")
	id := strconv.FormatInt(time.Now().UnixNano()%1_000_000, 10)
	const mid = 4242
	live, small := "live://"+id, "small://"+id
	liveS, smallS, userS := "room:"+live, "room:"+small, "user:"+strconv.Itoa(mid)
	claims := token.Claims{Mid: mid, Key: "recover-" + id, Rooms: []string{live, small}, Recover: true}

	var mu sync.Mutex
	bodies := map[string]map[uint64]string{liveS: {}, smallS: {}, userS: {}}
	pushRoom := func(typ, body string) {
		rep := h.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {typ}, "room": {id}}, body: body})
		record(t, &mu, bodies, rep, body)
	}
	pushUser := func(body string) {
		rep := h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {strconv.Itoa(mid)}}, body: body})
		record(t, &mu, bodies, rep, body)
	}
	bodyOf := func(stream string) func(uint64) string {
		return func(p uint64) string {
			mu.Lock()
			defer mu.Unlock()
			return bodies[stream][p]
		}
	}

	ps := client.NewPositions()
	c, r := h.connectRecover(claims, ps)
	if !r.Recover || len(r.Streams) != 3 {
		t.Fatalf("op 8 of an opted-in client: %+v", r)
	}
	if _, err := c.Resume(); err != nil {
		t.Fatal(err)
	}
	pushRoom("live", "first-live")
	pushRoom("small", "first-small")
	pushUser("first-user")
	sr := &streamReader{t: t, c: c, next: map[string]uint64{}, body: map[string]func(uint64) string{}}
	for _, s := range []string{liveS, smallS, userS} {
		sp, _ := ps.Get(s)
		sr.next[s], sr.body[s] = sp.Pos+1, bodyOf(s)
	}
	sr.read(map[string]uint64{liveS: sr.next[liveS], smallS: sr.next[smallS], userS: sr.next[userS]})
	_ = c.Close()

	for i := range 100 {
		pushRoom("live", fmt.Sprint("away-live-", i))
		pushUser(fmt.Sprint("away-user-", i))
	}
	for i := range 10 {
		pushRoom("small", fmt.Sprint("away-small-", i))
	}

	// Pushes go on while the client reconnects and recovers.
	var stop atomic.Bool
	var during atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load() || i < 50; i++ {
			pushRoom("live", fmt.Sprint("during-live-", i))
			pushUser(fmt.Sprint("during-user-", i))
			during.Add(1)
		}
	}()
	waitUntil(t, func() bool { return during.Load() >= 5 })
	c, _ = h.connectRecover(claims, ps)
	sr.c = c
	rep, err := c.Resume()
	if err != nil {
		t.Fatal(err)
	}
	stop.Store(true)
	wg.Wait()
	for _, res := range rep.Streams {
		switch res.Stream {
		case liveS, userS:
			if !res.Recovered {
				t.Fatalf("%s not recovered: %+v", res.Stream, res)
			}
		case smallS:
			if res.Recovered || res.Reason != wire.ReasonTrimmed || res.Pos != sr.next[smallS]-1+10 {
				t.Fatalf("small room: %+v, want not recovered, trimmed, pos %d", res, sr.next[smallS]-1+10)
			}
		}
	}
	first := map[string]uint64{liveS: sr.next[liveS], userS: sr.next[userS]}
	delete(sr.next, smallS) // resynced: nothing of it before its top comes
	until := lastPositions(bodies, &mu, []string{liveS, userS})
	sr.read(until)
	for s, top := range until {
		if got := top - first[s] + 1; got < 100+50 {
			t.Fatalf("%s: %d messages recovered and live, want at least 150", s, got)
		}
	}

	// Then live ones, the trimmed room's too, from the reply's top.
	sp, _ := ps.Get(smallS)
	sr.next[smallS] = sp.Pos + 1
	pushRoom("live", "after-live")
	pushRoom("small", "after-small")
	pushUser("after-user")
	sr.read(map[string]uint64{liveS: until[liveS] + 1, userS: until[userS] + 1, smallS: sp.Pos + 1})
}

// lastPositions is the highest position pushed to each stream of tops.
func lastPositions(bodies map[string]map[uint64]string, mu *sync.Mutex, streams []string) map[string]uint64 {
	mu.Lock()
	defer mu.Unlock()
	out := map[string]uint64{}
	for _, s := range streams {
		for p := range bodies[s] {
			out[s] = max(out[s], p)
		}
	}
	return out
}

// record remembers the body pushed at each position the push reply gives.
func record(t *testing.T, mu *sync.Mutex, bodies map[string]map[uint64]string, rep apiReply, body string) {
	t.Helper()
	var data struct {
		Positions []struct {
			Stream string `json:"stream"`
			Pos    uint64 `json:"pos"`
		} `json:"positions"`
	}
	if err := json.Unmarshal(rep.Data, &data); err != nil || len(data.Positions) == 0 {
		t.Errorf("push reply %s: no positions (%v)", rep.Data, err)
		return
	}
	mu.Lock()
	defer mu.Unlock()
	for _, p := range data.Positions {
		if bodies[p.Stream] != nil {
			bodies[p.Stream][p.Pos] = body
		}
	}
}

// waitUntil waits for cond, failing after wait.
func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"imcloud/proto/client"
	"imcloud/stages/logic"
)

// orderPushes is how many sequential pushes go to the room and to the
// user each: the 2,000. Both sequences run at once; the test took
// 5.1–6.9 s under -race on this 2-core machine shared with other test runs.
const orderPushes = 2000

// orderOp is the business operation of every push.
const orderOp = 1000

// TestOrderUnderRetries is the order promise: 2,000 sequential
// pushes to one room and 2,000 to one user, with job.concurrency = 8 and
// the first delivery of every 10th message failed (half before the node
// got it, half after, so job's retry is late or a duplicate). Every
// client — two that did not opt in to recovery and one that did, per
// stream — receives every message once, in push order; the positions the
// push replies give rise strictly, and the opted-in clients see the same
// positions, strictly rising.
//
// The embedded broker hands job one message at a time (it has no shared
// queue, so job.concurrency starts one consumer), but each waiting message
// waits in its own goroutine: while a retry backs off, the pushes behind
// it pile up and reach the node in whatever order those goroutines win
// the subscriber (Watermill's gochannel sends each message from its own
// goroutine under a mutex), which is where order used to break: with
// history.enabled = false this test fails at once (a client's first
// messages were pushes 2, 1, 3, 0). Several consumers
// on a real broker are the integration test's part.
func TestOrderUnderRetries(t *testing.T) {
	fail := func(body []byte) (bool, bool) {
		seq, err := bodySeq(body)
		if err != nil || seq%10 != 0 {
			return false, false
		}
		return true, seq%20 == 0
	}
	proxy := startFaultProxy(t, fail)
	// Order needs history to cover a gap (README): at the ~8,000 pushes/s
	// this test makes, the default room history (100) is trimmed past a
	// message held back 200 ms by its retry, which then comes late, out
	// of order, as the README says — 1 run in 3 once gap fills stopped
	// racing job's copies. Every push stays in history here.
	h := start(t, "job.concurrency=8", "cloud.advertise_addr="+proxy.addr,
		"history.rooms.live.size="+strconv.Itoa(2*orderPushes), "history.user.size="+strconv.Itoa(2*orderPushes))
	proxy.setBackend(t, h.addrs.CloudGRPC)

	const room, mid = "live://order", 77
	type target = orderTarget
	targets := []*target{
		{name: "room", prefix: "r", stream: "room:" + room, path: "/im/push/room",
			query: url.Values{"operation": {strconv.Itoa(orderOp)}, "type": {"live"}, "room": {"order"}}},
		{name: "user", prefix: "m", stream: "user:" + strconv.Itoa(mid), path: "/im/push/mids",
			query: url.Values{"operation": {strconv.Itoa(orderOp)}, "mids": {strconv.Itoa(mid)}}},
	}
	for i, tg := range targets {
		claims := func(n int, recover bool) jwt.MapClaims {
			c := jwt.MapClaims{"key": fmt.Sprintf("order-%s-%d", tg.name, n), "exp": time.Now().Add(time.Hour).Unix()}
			if tg.name == "room" {
				c["mid"], c["rooms"] = 100+i*10+n, []string{room}
			} else {
				c["mid"] = mid
			}
			if recover {
				c["recover"] = true
			}
			return c
		}
		tg.clients = []*orderClient{
			h.orderClient(t, tg.name+" ws", "ws", claims(0, false), false),
			h.orderClient(t, tg.name+" tcp", "tcp", claims(1, false), false),
			h.orderClient(t, tg.name+" ws opted in", "ws", claims(2, true), true),
		}
	}

	var wg sync.WaitGroup
	for _, tg := range targets {
		for _, c := range tg.clients {
			wg.Add(1)
			go func() { defer wg.Done(); c.read(tg.prefix, tg.stream, orderPushes) }()
		}
	}
	// replies[i] is push i's position in the target's stream.
	replies := make([][]logic.Position, len(targets))
	errs := make([]error, len(targets))
	start := time.Now()
	for i, tg := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			replies[i], errs[i] = tg.pushAll(h.addrs.HTTP, orderPushes)
		}()
	}
	wg.Wait()
	t.Logf("%d pushes to each stream and their deliveries took %s", orderPushes, time.Since(start))

	for i, tg := range targets {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		// Accept order is position order: each reply's position is
		// the one before it plus one, in one epoch.
		for seq := 1; seq < len(replies[i]); seq++ {
			prev, cur := replies[i][seq-1], replies[i][seq]
			if cur.Epoch != prev.Epoch || cur.Pos != prev.Pos+1 {
				t.Fatalf("%s: push %d has position %s/%d after %s/%d: positions must rise by one in accept order", tg.name, seq, cur.Epoch, cur.Pos, prev.Epoch, prev.Pos)
			}
		}
		for _, c := range tg.clients {
			c.check(t, replies[i])
		}
	}
	// A tenth of the messages of both streams failed once.
	if got, want := proxy.injected.Load(), int64(2*orderPushes/10); got != want {
		t.Fatalf("the proxy failed %d deliveries, want %d: the retries this test is about did not happen", got, want)
	}
}

// orderTarget is a stream the order tests push to, and its clients.
type orderTarget struct {
	name    string
	prefix  string // body prefix: "r" or "m"
	stream  string
	path    string
	query   url.Values
	clients []*orderClient
}

// pushAll pushes n bodies prefix-NNNNN in sequence, each after the last
// was answered, and returns each push's position in the stream.
func (tg *orderTarget) pushAll(addr string, n int) ([]logic.Position, error) {
	var replies []logic.Position
	for seq := range n {
		res, err := pushOnce(addr, tg.path, tg.query, fmt.Sprintf("%s-%05d", tg.prefix, seq))
		if err != nil {
			return replies, fmt.Errorf("%s push %d: %w", tg.name, seq, err)
		}
		if len(res.Positions) != 1 || res.Positions[0].Stream != tg.stream {
			return replies, fmt.Errorf("%s push %d: positions %+v, want one in %s", tg.name, seq, res.Positions, tg.stream)
		}
		replies = append(replies, res.Positions[0])
	}
	return replies, nil
}

// orderClient is one connection reading a stream's pushes.
type orderClient struct {
	name    string
	c       *client.Conn
	optedIn bool // the server confirmed the opt-in (op 8 "recover")

	// Set by read.
	seqs []int
	msgs []client.Message
	err  error
}

// orderClient connects with a JWT of claims (signed here: token.Claims
// has no recover claim) and, for a client that opts in, sends its op 21
// naming no stream, which ends the hold on its positioned messages.
func (h *harness) orderClient(t *testing.T, name, transport string, claims jwt.MapClaims, optIn bool) *orderClient {
	t.Helper()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString([]byte(testSecret))
	if err != nil {
		t.Fatal(err)
	}
	c := h.dial(transport)
	reply, err := c.Auth([]byte(tok))
	if err != nil {
		t.Fatalf("%s: auth: %v", name, err)
	}
	oc := &orderClient{name: name, c: c, optedIn: reply.Recover}
	switch {
	case optIn && !reply.Recover:
		t.Errorf("%s: opted in with the recover claim, op 8 %+v does not say so", name, reply)
	case !optIn && reply.Recover:
		t.Fatalf("%s: did not opt in, op 8 %+v says recover", name, reply)
	case optIn:
		if _, err := c.Recover(nil); err != nil {
			t.Fatalf("%s: op 21: %v", name, err)
		}
	}
	return oc
}

// read reads n pushes of the stream, each body prefix-NNNNN; it stops at
// the first error, which check reports.
func (o *orderClient) read(prefix, stream string, n int) {
	for len(o.seqs) < n {
		_ = o.c.SetReadDeadline(time.Now().Add(wait))
		m, err := o.c.ReadMessage()
		if err != nil {
			o.err = fmt.Errorf("after %d messages: %w", len(o.seqs), err)
			return
		}
		if m.Op != orderOp || !strings.HasPrefix(string(m.Body), prefix+"-") {
			o.err = fmt.Errorf("after %d messages: op %d %q, want op %d %s-NNNNN", len(o.seqs), m.Op, m.Body, orderOp, prefix)
			return
		}
		if o.optedIn && m.Stream != stream {
			o.err = fmt.Errorf("after %d messages: %q came in stream %q, want %q", len(o.seqs), m.Body, m.Stream, stream)
			return
		}
		seq, err := bodySeq(m.Body)
		if err != nil {
			o.err = err
			return
		}
		m.Body = nil // valid only until the next read
		o.seqs = append(o.seqs, seq)
		o.msgs = append(o.msgs, m)
	}
}

// check: every message, in push order, once; positioned ones at the
// position their push's reply gave, strictly rising.
func (o *orderClient) check(t *testing.T, replies []logic.Position) {
	t.Helper()
	if o.err != nil {
		t.Fatalf("%s: %v", o.name, o.err)
	}
	for i, seq := range o.seqs {
		if seq != i {
			t.Fatalf("%s: message %d is push %d (the ones around it: %v), want every push once in push order", o.name, i, seq, o.seqs[max(i-3, 0):min(i+4, len(o.seqs))])
		}
		if !o.optedIn {
			continue
		}
		m, want := o.msgs[i], replies[seq]
		if m.Epoch != want.Epoch || m.Pos != want.Pos || m.Gap || m.Dup {
			t.Fatalf("%s: push %d came at %s/%d (gap %t, dup %t), its reply gave %s/%d", o.name, seq, m.Epoch, m.Pos, m.Gap, m.Dup, want.Epoch, want.Pos)
		}
		if i > 0 && m.Pos <= o.msgs[i-1].Pos {
			t.Fatalf("%s: position %d after %d", o.name, m.Pos, o.msgs[i-1].Pos)
		}
	}
}

// bodySeq is the number in a body "x-NNNNN".
func bodySeq(body []byte) (int, error) {
	_, n, ok := strings.Cut(string(body), "-")
	if !ok {
		return 0, fmt.Errorf("body %q has no sequence number", body)
	}
	seq, err := strconv.Atoi(n)
	if err != nil {
		return 0, fmt.Errorf("body %q: %w", body, err)
	}
	return seq, nil
}

// pushOnce posts one push and returns its result; unlike harness.push it
// can run off the test's goroutine.
func pushOnce(addr, path string, query url.Values, body string) (logic.PushResult, error) {
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+path+"?"+query.Encode(), strings.NewReader(body))
	if err != nil {
		return logic.PushResult{}, err
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return logic.PushResult{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return logic.PushResult{}, err
	}
	var rep struct {
		Code int              `json:"code"`
		Data logic.PushResult `json:"data"`
	}
	if err := json.Unmarshal(b, &rep); err != nil || resp.StatusCode != http.StatusOK || rep.Code != 0 {
		return logic.PushResult{}, fmt.Errorf("status %d, reply %q", resp.StatusCode, b)
	}
	return rep.Data, nil
}

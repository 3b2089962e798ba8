package job

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"google.golang.org/grpc"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// keyCloud is a cloud node holding some keys. Like the real one it
// remembers which keys it delivered each message id to, and answers a
// repeat for such a key as delivered without delivering it again.
type keyCloud struct {
	pb.UnimplementedCloudServer
	mu     sync.Mutex
	online map[string]bool
	seen   map[string]bool
	calls  int
	got    map[string][]string // bodies delivered per key
	// streams lists, per key, the streams of the positions each delivery
	// to it carried.
	streams map[string][]string
}

func (c *keyCloud) PushMsg(_ context.Context, req *pb.PushMsgReq) (*pb.PushMsgReply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	reply := &pb.PushMsgReply{}
	for _, k := range req.Keys {
		id := req.Proto.Id + "\x00" + k
		switch {
		case c.seen[id]:
			reply.Delivered++
		case c.online[k]:
			c.seen[id] = true
			c.got[k] = append(c.got[k], string(req.Proto.Body))
			var streams []string
			for _, sp := range req.Proto.Positions {
				streams = append(streams, fmt.Sprintf("%s@%s/%d", sp.Stream, sp.Epoch, sp.Pos))
			}
			c.streams[k] = append(c.streams[k], strings.Join(streams, " "))
			reply.Delivered++
		default:
			reply.Offline = append(reply.Offline, k)
		}
	}
	return reply, nil
}

func (c *keyCloud) setOnline(key string, on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.online[key] = on
}

func (c *keyCloud) received(key string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got[key])
}

func (c *keyCloud) callCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls
}

func startKeyCloud(t *testing.T, online ...string) (*keyCloud, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &keyCloud{online: map[string]bool{}, seen: map[string]bool{}, got: map[string][]string{}, streams: map[string][]string{}}
	for _, k := range online {
		c.online[k] = true
	}
	srv := grpc.NewServer()
	pb.RegisterCloudServer(srv, c)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return c, ln.Addr().String()
}

// registry lists nodes and, like logic's registry, where each key is
// connected now.
type registry struct {
	nodes   reportedNodes
	mu      sync.Mutex
	keys    map[string]string
	mids    map[string]int64 // key -> its user
	lookups int
}

func (r *registry) Nodes(context.Context) ([]*pb.NodeInfo, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups++
	return slices.Clone(r.nodes), nil
}

func (r *registry) addNode(n *pb.NodeInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes = append(r.nodes, n)
}

func (r *registry) ServersByKeys(_ context.Context, keys []string) (map[string]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]string{}
	for _, k := range keys {
		if s, ok := r.keys[k]; ok {
			out[k] = s
		}
	}
	return out, nil
}

func (r *registry) KeysByMids(_ context.Context, mids []int64) (map[int64]map[string]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[int64]map[string]string{}
	for _, m := range mids {
		for k, mid := range r.mids {
			if mid == m {
				if out[m] == nil {
					out[m] = map[string]string{}
				}
				out[m][k] = r.keys[k]
			}
		}
	}
	return out, nil
}

// reconnect gives a user a new key on server, as a client without a key
// claim gets when it connects again; the old session stays listed when
// stale (its node was killed and never ended it).
func (r *registry) reconnect(mid int64, old, key, server string, stale bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !stale {
		delete(r.keys, old)
		delete(r.mids, old)
	}
	r.keys[key] = server
	r.mids[key] = mid
}

func (r *registry) move(key, server string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys[key] = server
}

// pipe runs a job stage behind the production middleware stack on a
// gochannel broker. Publishing blocks until the message is acked.
type pipe struct {
	t        *testing.T
	pubsub   *gochannel.GoChannel
	poisoned <-chan *message.Message
}

func runJob(t *testing.T, nodes Nodes, grace time.Duration) *pipe {
	t.Helper()
	return runJobKeeping(t, nodes, grace, 0)
}

// runJobKeeping is runJob keeping the node list for nodesTTL.
func runJobKeeping(t *testing.T, nodes Nodes, grace, nodesTTL time.Duration) *pipe {
	t.Helper()
	logger := slog.New(slog.DiscardHandler)
	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, pipeline.WatermillLogger(logger))
	t.Cleanup(func() { _ = pubsub.Close() })
	def := config.Default().Job
	cfg := pipeline.RouterConfig{Timeout: def.Timeout, MaxRetries: def.Retry.MaxRetries, InitialInterval: time.Millisecond, MaxInterval: 5 * time.Millisecond,
		Multiplier: def.Retry.Multiplier, DedupeTTL: def.Dedupe.TTL, ConfigHold: config.ConfigFaultHold}
	r, err := pipeline.NewRouter(cfg, "poison", pubsub, memory.NewDedupe(time.Minute), logger)
	if err != nil {
		t.Fatal(err)
	}
	s := New(Options{Nodes: nodes, Logger: logger, Timeout: 5 * time.Second, OfflineGrace: grace, NodesTTL: nodesTTL})
	t.Cleanup(func() { _ = s.Close() })
	s.AddHandlers(r, pubsub, []string{"push"}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	poison, err := pubsub.Subscribe(ctx, "poison")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = r.Run(ctx) }()
	<-r.Running()
	t.Cleanup(func() { _ = r.Close() })
	return &pipe{t: t, pubsub: pubsub, poisoned: poison}
}

// push publishes a key push to server in the background; the channel
// yields once job acked it.
func (p *pipe) push(id, server, body string, keys ...string) <-chan error {
	return p.pushMids(id, server, body, nil, keys...)
}

// pushMids publishes a push logic resolved from users' ids, byMid being
// their keys as logic found them.
func (p *pipe) pushMids(id, server, body string, byMid map[int64]map[string]string, keys ...string) <-chan error {
	return p.pushPositioned(id, server, body, byMid, nil, keys...)
}

// pushPositioned is pushMids of a push logic gave positions.
func (p *pipe) pushPositioned(id, server, body string, byMid map[int64]map[string]string, positions []*pb.StreamPos, keys ...string) <-chan error {
	msg, err := pipeline.NewPushMessage(id, "corr", &pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: 1000, Server: server, Keys: keys, Msg: []byte(body), Positions: positions})
	if err != nil {
		p.t.Fatal(err)
	}
	pipeline.SetMidKeys(msg, keys, byMid)
	done := make(chan error, 1)
	go func() { done <- p.pubsub.Publish("push", msg) }()
	return done
}

func (p *pipe) acked(done <-chan error) {
	p.t.Helper()
	select {
	case err := <-done:
		if err != nil {
			p.t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		p.t.Fatal("message not acked")
	}
}

// poison waits for the next poisoned message and acks it.
func (p *pipe) poison() *message.Message {
	p.t.Helper()
	select {
	case m := <-p.poisoned:
		m.Ack()
		return m
	case <-time.After(10 * time.Second):
		p.t.Fatal("nothing poisoned")
		return nil
	}
}

// noPoison fails if a message was poisoned. Publishing blocks until the
// ack, and the poison publish comes before it, so once a push was acked
// anything it poisoned is already here.
func (p *pipe) noPoison() {
	p.t.Helper()
	select {
	case m := <-p.poisoned:
		p.t.Fatalf("poisoned: %s", m.Metadata.Get(middleware.ReasonForPoisonedKey))
	default:
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestKeyOfflineAtDeliveryIsDeliveredOnceItReconnects(t *testing.T) {
	cloud, addr := startKeyCloud(t, "here")
	p := runJob(t, reportedNodes{{Id: "c1", GrpcAddr: addr}}, time.Minute)
	// "back" was online when logic accepted the push; its node restarted
	// and it has not reconnected yet.
	done := p.push("m1", "c1", "hello", "back", "here")
	waitFor(t, "job to find the key offline twice", func() bool { return cloud.callCount() >= 2 })
	cloud.setOnline("back", true)
	p.acked(done)
	p.noPoison()
	if got := cloud.received("back"); !slices.Equal(got, []string{"hello"}) {
		t.Fatalf("reconnected key got %q, want [hello]", got)
	}
	if got := cloud.received("here"); !slices.Equal(got, []string{"hello"}) {
		t.Fatalf("key online throughout got %q, want [hello] once", got)
	}
}

func TestKeyThatMovedNodeIsDeliveredWhereItIsNow(t *testing.T) {
	old, oldAddr := startKeyCloud(t)
	now, nowAddr := startKeyCloud(t, "k")
	reg := &registry{nodes: reportedNodes{{Id: "old", GrpcAddr: oldAddr}, {Id: "new", GrpcAddr: nowAddr}}, keys: map[string]string{"k": "old"}}
	p := runJob(t, reg, time.Minute)
	done := p.push("m1", "old", "hello", "k")
	waitFor(t, "job to find the key offline", func() bool { return old.callCount() >= 1 })
	reg.move("k", "new")
	p.acked(done)
	p.noPoison()
	if got := now.received("k"); !slices.Equal(got, []string{"hello"}) {
		t.Fatalf("key on its new node got %q, want [hello]", got)
	}
}

func TestKeyOfflinePastGraceIsPoisonedWithOnlyTheUndeliveredKeys(t *testing.T) {
	const grace = 300 * time.Millisecond
	cloud, addr := startKeyCloud(t, "here")
	p := runJob(t, reportedNodes{{Id: "c1", GrpcAddr: addr}}, grace)
	start := time.Now()
	done := p.push("m1", "c1", "hello", "gone", "here")
	m := p.poison()
	p.acked(done)
	if held := time.Since(start); held < grace {
		t.Fatalf("poisoned after %s, before the %s grace", held, grace)
	}
	reason := m.Metadata.Get(middleware.ReasonForPoisonedKey)
	if !strings.HasPrefix(reason, pipeline.ReasonRecipientsOffline) {
		t.Fatalf("poison reason %q, want it to start with %q", reason, pipeline.ReasonRecipientsOffline)
	}
	pm, err := pipeline.DecodePush(m)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(pm.Keys, []string{"gone"}) || string(pm.Msg) != "hello" {
		t.Fatalf("poisoned push holds keys %v, want only the undelivered [gone]", pm.Keys)
	}

	// The key has been offline for its whole grace: the next push to it
	// goes to poison at once, not after another grace period.
	calls := cloud.callCount()
	done = p.push("m2", "c1", "again", "gone")
	p.poison()
	p.acked(done)
	if n := cloud.callCount() - calls; n != 1 {
		t.Fatalf("a key long offline was called %d times for one push, want 1", n)
	}

	// A replay once the client is back delivers to it alone: the partial
	// delivery was not taken for a delivered message id.
	cloud.setOnline("gone", true)
	replay := message.NewMessage(m.UUID, m.Payload)
	replay.Metadata = maps.Clone(m.Metadata)
	replayed := make(chan error, 1)
	go func() { replayed <- p.pubsub.Publish("push", replay) }()
	p.acked(replayed)
	p.noPoison()
	if got := cloud.received("gone"); !slices.Equal(got, []string{"hello"}) {
		t.Fatalf("replayed push gave the returning key %q, want [hello]", got)
	}
	if got := cloud.received("here"); !slices.Equal(got, []string{"hello"}) {
		t.Fatalf("replay delivered again to a key that had it: %q", got)
	}
}

func TestKeysOfALapsedNodeAreHeldUntilItIsBack(t *testing.T) {
	cloud, addr := startKeyCloud(t)
	// The node was killed: it dropped out of the registry, and its
	// sessions still name it.
	reg := &registry{keys: map[string]string{"k": "c1"}}
	p := runJob(t, reg, time.Minute)
	done := p.push("m1", "c1", "hello", "k")
	waitFor(t, "job to look for the node twice", func() bool {
		reg.mu.Lock()
		defer reg.mu.Unlock()
		return reg.lookups >= 2
	})
	select {
	case <-done:
		t.Fatal("push acked while its node was gone")
	default:
	}
	// The node restarts and registers; its client reconnects.
	cloud.setOnline("k", true)
	reg.addNode(&pb.NodeInfo{Id: "c1", GrpcAddr: addr})
	p.acked(done)
	p.noPoison()
	if got := cloud.received("k"); !slices.Equal(got, []string{"hello"}) {
		t.Fatalf("key got %q after its node came back, want [hello]", got)
	}
}

func TestKeysOfALapsedNodePastGraceArePoisoned(t *testing.T) {
	reg := &registry{keys: map[string]string{}}
	p := runJob(t, reg, 200*time.Millisecond)
	done := p.push("m1", "restarting", "hello", "k")
	m := p.poison()
	p.acked(done)
	if reason := m.Metadata.Get(middleware.ReasonForPoisonedKey); !strings.Contains(reason, "restarting (gone)") {
		t.Fatalf("poison reason %q does not name the lapsed node", reason)
	}
}

func TestMidPushReachesTheConnectionTheUserMadeAfterARestart(t *testing.T) {
	// A killed node never ended its sessions: the registry may still list
	// the old key until its session expires.
	for _, staleSession := range []bool{false, true} {
		t.Run(fmt.Sprintf("old session listed=%v", staleSession), func(t *testing.T) {
			restarted, rAddr := startKeyCloud(t)
			other, oAddr := startKeyCloud(t, "phone")
			reg := &registry{
				nodes: reportedNodes{{Id: "c1", GrpcAddr: rAddr}, {Id: "c2", GrpcAddr: oAddr}},
				keys:  map[string]string{"laptop": "c1", "phone": "c2"},
				mids:  map[string]int64{"laptop": 7, "phone": 7},
			}
			p := runJob(t, reg, time.Minute)
			// User 7 had a laptop on c1 and a phone on c2; this message is
			// c1's share of the push. c1 restarted before job delivered it.
			byMid := map[int64]map[string]string{7: {"laptop": "c1", "phone": "c2"}}
			done := p.pushMids("m1/c1", "c1", "hello", byMid, "laptop")
			waitFor(t, "job to find the laptop offline", func() bool { return restarted.callCount() >= 1 })
			// The laptop connects again, without a key claim: a new key.
			restarted.setOnline("laptop-2", true)
			reg.reconnect(7, "laptop", "laptop-2", "c1", staleSession)
			p.acked(done)
			p.noPoison()
			if got := restarted.received("laptop-2"); !slices.Equal(got, []string{"hello"}) {
				t.Fatalf("the user's new connection got %q, want [hello]", got)
			}
			if got := other.received("phone"); len(got) != 0 {
				t.Fatalf("the phone, reached by c2's share of the push, got %q from c1's", got)
			}
		})
	}
}

func TestOfflineKeysGraceCountsOncePerAbsence(t *testing.T) {
	const grace = time.Minute
	o := newOfflineKeys(2)
	first := o.graceEnd([]string{"k"}, grace)
	if again := o.graceEnd([]string{"k"}, grace); !again.Equal(first) {
		t.Fatalf("a key found offline again within its grace got a new grace: %v, then %v", first, again)
	}
	// Not found offline for a whole grace period: a new absence.
	o.mu.Lock()
	o.keys["k"] = offlineSpan{since: time.Now().Add(-3 * grace), last: time.Now().Add(-2 * grace)}
	o.mu.Unlock()
	if fresh := o.graceEnd([]string{"k"}, grace); time.Until(fresh) < grace-time.Second {
		t.Fatalf("a key back from a long absence got a grace ending in %s, want a full %s", time.Until(fresh), grace)
	}
	// Delivered: forgotten.
	o.forget([]string{"k"})
	if o.n.Load() != 0 {
		t.Fatalf("%d keys remembered after delivery", o.n.Load())
	}
	// Full: stale entries make room; past the limit keys are not kept.
	o.graceEnd([]string{"a", "b"}, grace)
	o.graceEnd([]string{"c"}, grace)
	if o.n.Load() != 2 {
		t.Fatalf("%d keys remembered, limit 2", o.n.Load())
	}
}

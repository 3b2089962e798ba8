package cloud

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// clusterLogic is one logic behind two cloud nodes: it keeps sessions in a
// real registry and, between registering a session and answering its
// Connect, hands the test the previous session to close (what logic's
// replacer does in the background), so that the test orders the calls.
type clusterLogic struct {
	*fakeLogic
	reg *memory.Registry

	mu       sync.Mutex
	afterAdd func(server string, conn uint64, key, prev string, prevConn uint64)
}

func (l *clusterLogic) Connect(ctx context.Context, in *pb.ConnectReq, opts ...grpc.CallOption) (*pb.ConnectReply, error) {
	reply, err := l.fakeLogic.Connect(ctx, in, opts...)
	if err != nil {
		return nil, err
	}
	prev, prevConn, err := l.reg.AddSession(ctx, reply.Mid, reply.Key, in.Server, in.Conn)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	hook := l.afterAdd
	l.mu.Unlock()
	if hook != nil {
		hook(in.Server, in.Conn, reply.Key, prev, prevConn)
	}
	return reply, nil
}

func (l *clusterLogic) Disconnect(ctx context.Context, in *pb.DisconnectReq, _ ...grpc.CallOption) (*pb.DisconnectReply, error) {
	has, err := l.reg.DelSession(ctx, in.Mid, in.Key, in.Server, in.Conn)
	if err != nil {
		return nil, err
	}
	return &pb.DisconnectReply{Has: has}, nil
}

func (l *clusterLogic) setAfterAdd(f func(server string, conn uint64, key, prev string, prevConn uint64)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.afterAdd = f
}

// twoNodes starts nodes "A" and "B" behind one clusterLogic.
func twoNodes(t *testing.T) (a, b *node, l *clusterLogic) {
	t.Helper()
	l = &clusterLogic{fakeLogic: &fakeLogic{disconnects: map[string]int{}, rooms: map[string]int32{}}, reg: memory.New(time.Minute, time.Minute)}
	return startNodeAs(t, "A", l), startNodeAs(t, "B", l), l
}

// closeOn is logic's replacer: it closes connection conn of key on the
// node it was registered on.
func closeOn(t *testing.T, nodes map[string]*node, key, server string, conn uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := nodes[server].rpc.Close(ctx, &pb.CloseReq{Key: key, Conn: conn}); err != nil {
		t.Errorf("close %s conn %d on %s: %v", key, conn, server, err)
	}
}

// expectReplaced reads c until it closes, and fails unless with 4009.
func expectReplaced(t *testing.T, name string, c *client.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(wait))
	for {
		p, err := c.Read()
		if err == nil {
			t.Logf("%s: read op %d before its close", name, p.Op)
			continue
		}
		if code := client.CloseCode(err); code != closeReplaced {
			t.Fatalf("%s ended with %v (close %d), want close %d", name, err, code, closeReplaced)
		}
		return
	}
}

// expectOnlyOn pushes to key on both nodes and checks that exactly the
// connection c on node on receives it, and the registry says on.
func expectOnlyOn(t *testing.T, l *clusterLogic, nodes map[string]*node, key, on string, c *client.Conn) {
	t.Helper()
	servers, err := l.reg.ServersByKeys(context.Background(), []string{key})
	if err != nil || servers[key] != on {
		t.Fatalf("registry has %s on %v (%v), want on %s", key, servers, err, on)
	}
	for id, n := range nodes {
		r, err := n.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: []string{key}, Proto: &pb.Proto{Op: 1000, Body: []byte("to " + id)}})
		if err != nil {
			t.Fatal(err)
		}
		want := int32(0)
		if id == on {
			want = 1
		}
		if r.Delivered != want {
			t.Fatalf("push to %s on node %s delivered to %d connections, want %d", key, id, r.Delivered, want)
		}
	}
	_ = c.SetReadDeadline(time.Now().Add(wait))
	p, err := c.Read()
	if err != nil || string(p.Body) != "to "+on {
		t.Fatalf("the registered connection on %s got %q, %v; want the push", on, p.Body, err)
	}
}

// TestReplacedDuringHandshakeOnOtherNodeCloses: a key connected on A
// (a1) reconnects on A (a2) and on B (b1) at once. a2 registers first
// (same node: nothing to close), then b1, whose Close for a2 reaches A
// while a2 is still between logic's Connect and the node's bucket. Closing
// by key closed a1 there and let a2 in: two live connections, pushes going
// to b1 only. Now A remembers a2 and closes it as it arrives; b1 alone
// stays, registered, and gets the key's pushes.
func TestReplacedDuringHandshakeOnOtherNodeCloses(t *testing.T) {
	a, b, l := twoNodes(t)
	nodes := map[string]*node{"A": a, "B": b}
	cl := claims{Mid: 1, Key: "xr1"}
	a1 := a.connect(t, "ws", cl)

	a2Held := make(chan struct{})
	release := make(chan struct{})
	l.setAfterAdd(func(server string, conn uint64, key, prev string, prevConn uint64) {
		if prev != "" {
			closeOn(t, nodes, key, prev, prevConn)
		}
		if server == "A" {
			close(a2Held)
			select {
			case <-release:
			case <-time.After(wait):
			}
		}
	})
	a2 := a.dial(t, "ws", nil)
	a2Auth := make(chan error, 1)
	go func() {
		tok, _ := json.Marshal(cl)
		_, err := a2.Auth(tok)
		a2Auth <- err
	}()
	select {
	case <-a2Held:
	case <-time.After(wait):
		t.Fatal("a2's Connect never reached logic")
	}
	b1 := b.connect(t, "ws", cl)
	close(release)

	if err := <-a2Auth; client.CloseCode(err) != closeReplaced {
		t.Fatalf("a2, replaced on B during its handshake: auth %v (close %d), want close %d", err, client.CloseCode(err), closeReplaced)
	}
	expectReplaced(t, "a1", a1)
	expectOnlyOn(t, l, nodes, cl.Key, "B", b1)
}

// TestLateCloseSparesNewerConnection: a1 on A is replaced by b1 on B,
// whose Close to A is slow; meanwhile the key reconnects on A (a2),
// replacing b1. The late Close, by key alone, closed a2: every
// connection of the key closed with 4009, and the client, told it was
// replaced, stayed offline. Now it names a1 and a2 stays.
func TestLateCloseSparesNewerConnection(t *testing.T) {
	a, b, l := twoNodes(t)
	nodes := map[string]*node{"A": a, "B": b}
	cl := claims{Mid: 1, Key: "xr2"}
	a1 := a.connect(t, "ws", cl)

	late := make(chan func(), 1)
	l.setAfterAdd(func(server string, conn uint64, key, prev string, prevConn uint64) {
		switch {
		case prev == "":
		case server == "B":
			late <- func() { closeOn(t, nodes, key, prev, prevConn) } // held back
		default:
			closeOn(t, nodes, key, prev, prevConn)
		}
	})
	b1 := b.connect(t, "ws", cl)
	var closeA1 func()
	select {
	case closeA1 = <-late:
	default:
		t.Fatal("b1's Connect did not replace a1 on A")
	}
	a2 := a.connect(t, "ws", cl)
	expectReplaced(t, "b1", b1)
	expectReplaced(t, "a1", a1)
	closeA1()
	expectOnlyOn(t, l, nodes, cl.Key, "A", a2)
}

// TestBucketTombs: what Close buries is refused at put while it lasts,
// once; a connection holding the key is returned, not buried; conn 0 (an
// older logic) is whichever holds the key; and the remembered connections
// stay within maxTombs however many logic sends.
func TestBucketTombs(t *testing.T) {
	now := time.Now()
	chan1 := func(key string, conn uint64) *channel { return &channel{key: key, conn: conn} }
	for _, tc := range []struct {
		name       string
		held       *channel // in the bucket before the Close
		closeConn  uint64
		after      time.Duration // from the Close to the put
		put        *channel
		wantClosed uint64 // the conn Close returns; 0: none
		wantBuried bool
	}{
		{"held connection named", chan1("k", 1), 1, 0, nil, 1, false},
		{"conn 0 closes whichever holds the key", chan1("k", 1), 0, 0, nil, 1, false},
		{"newer connection spared, named one refused", chan1("k", 2), 1, time.Second, chan1("k", 1), 0, true},
		{"named one refused, takes the older one along", chan1("k", 1), 2, time.Second, chan1("k", 2), 0, true},
		{"named one refused in its handshake", nil, 1, time.Second, chan1("k", 1), 0, true},
		{"another connection of the key admitted", nil, 1, time.Second, chan1("k", 3), 0, false},
		{"another key admitted", nil, 1, time.Second, chan1("j", 1), 0, false},
		{"lapsed tomb forgotten", nil, 1, tombTTL, chan1("k", 1), 0, false},
		{"conn 0 buries nothing", nil, 0, time.Second, chan1("k", 1), 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBuckets(1)[0]
			if tc.held != nil {
				b.put(tc.held, now)
			}
			got := b.closeConn("k", tc.closeConn, now)
			if (got == nil && tc.wantClosed != 0) || (got != nil && got.conn != tc.wantClosed) {
				t.Fatalf("Close returned %v, want conn %d", got, tc.wantClosed)
			}
			if tc.put == nil {
				return
			}
			old, buried := b.put(tc.put, now.Add(tc.after))
			if buried != tc.wantBuried {
				t.Fatalf("put buried = %v, want %v", buried, tc.wantBuried)
			}
			if tc.wantBuried && b.get(tc.put.key) == tc.put {
				t.Fatal("a buried connection took the key")
			}
			// The held connection goes unless it is newer than a refused one.
			keep := tc.held != nil && tc.wantBuried && tc.held.conn > tc.put.conn
			if want := tc.held; keep {
				if old != nil || b.get("k") != tc.held {
					t.Fatalf("refused put replaced %v; the newer held connection must stay", old)
				}
			} else if old != want {
				t.Fatalf("put replaced %v, want %v", old, want)
			}
			if keep {
				return
			}
			if again, buried := b.put(chan1(tc.put.key, tc.put.conn), now.Add(tc.after)); buried || (tc.wantBuried && again != nil) {
				t.Fatalf("after a refused put: buried again %v, key held by %v", buried, again)
			}
		})
	}
	t.Run("bounded", func(t *testing.T) {
		b := newBuckets(1)[0]
		for i := range 3 * maxTombs {
			b.closeConn(fmt.Sprint("k", i), 1, now)
		}
		if len(b.tombs) > maxTombs || len(b.tombOrder) > maxTombs {
			t.Fatalf("%d tombs, %d in order; want at most %d", len(b.tombs), len(b.tombOrder), maxTombs)
		}
		if _, buried := b.put(chan1(fmt.Sprint("k", 3*maxTombs-1), 1), now); !buried {
			t.Fatal("the newest tomb was forgotten")
		}
		if _, buried := b.put(chan1("k0", 1), now); buried {
			t.Fatal("the oldest tomb past the bound was kept")
		}
	})
}

// TestCloseRefusesInvalidKeys: a Close names a key to remember when its
// connection is not there yet; an invalid one is refused before anything
// is remembered.
func TestCloseRefusesInvalidKeys(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	for _, key := range []string{"", strings.Repeat("k", wire.MaxKeyLen+1), "k\x00", "k\xff", "a key"} {
		_, err := n.rpc.Close(context.Background(), &pb.CloseReq{Key: key, Conn: 7})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("Close(%q): %v, want InvalidArgument", key, err)
		}
	}
	for _, b := range n.st.buckets {
		b.mu.Lock()
		tombs := len(b.tombs)
		b.mu.Unlock()
		if tombs != 0 {
			t.Fatalf("a refused Close left %d tombs", tombs)
		}
	}
}

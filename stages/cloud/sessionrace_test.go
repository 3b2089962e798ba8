package cloud

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
)

// racingLogic keeps sessions in a real registry, as logic does, and holds
// the second Connect between registering the session and answering, until
// the first connection's Disconnect has arrived: the window in which the
// new connection is registered in logic but not yet in the node's bucket.
type racingLogic struct {
	*fakeLogic
	reg *memory.Registry

	mu            sync.Mutex
	connects      int
	bRegistered   chan struct{} // closed when the second Connect registered its session
	aDisconnected chan struct{} // closed when the first Disconnect was handled
	conns         []uint64      // the conn of every Connect, in order
}

func (l *racingLogic) Connect(ctx context.Context, in *pb.ConnectReq, opts ...grpc.CallOption) (*pb.ConnectReply, error) {
	reply, err := l.fakeLogic.Connect(ctx, in, opts...)
	if err != nil {
		return nil, err
	}
	if _, _, err := l.reg.AddSession(ctx, reply.Mid, reply.Key, in.Server, in.Conn); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.connects++
	n := l.connects
	l.conns = append(l.conns, in.Conn)
	l.mu.Unlock()
	if n == 2 {
		close(l.bRegistered)
		select {
		case <-l.aDisconnected:
		case <-time.After(wait):
		}
	}
	return reply, nil
}

func (l *racingLogic) Disconnect(ctx context.Context, in *pb.DisconnectReq, _ ...grpc.CallOption) (*pb.DisconnectReply, error) {
	has, err := l.reg.DelSession(ctx, in.Mid, in.Key, in.Server, in.Conn)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.fakeLogic.mu.Lock()
	l.fakeLogic.disconnects[in.Key]++
	first := l.fakeLogic.disconnects[in.Key] == 1
	l.fakeLogic.mu.Unlock()
	if first {
		close(l.aDisconnected)
	}
	return &pb.DisconnectReply{Has: has}, nil
}

// startNodeWithLogic is startNode with the given logic client.
func startNodeWithLogic(t *testing.T, logic pb.LogicClient) *node {
	t.Helper()
	return startNodeAs(t, "n1", logic)
}

// startNodeAs is startNodeWithLogic for node id.
func startNodeAs(t *testing.T, id string, logic pb.LogicClient) *node {
	t.Helper()
	cfg := config.Default().Cloud
	up := gochannel.NewGoChannel(gochannel.Config{OutputChannelBuffer: 64}, nil)
	st := New(cfg, Options{Self: &pb.NodeInfo{Id: id, GrpcAddr: "127.0.0.1:1"}, Logic: logic, Upstream: up, UpstreamTopic: "up", Logger: slog.New(slog.DiscardHandler)})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = st.ServeTCP(ln) }()
	ws := httptest.NewUnstartedServer(st.WSHandler())
	ws.Listener = st.Listener(ws.Listener)
	ws.Start()
	t.Cleanup(func() {
		_ = ln.Close()
		ws.CloseClientConnections()
		ws.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = st.Drain(ctx)
		_ = up.Close()
	})
	return &node{st: st, rpc: &grpcServer{s: st}, upstream: up, tcpAddr: ln.Addr().String(),
		wsURL: "ws" + strings.TrimPrefix(ws.URL, "http") + "/sub", tcpLn: ln, ws: ws}
}

// TestReconnectRaceKeepsNewSessionRegistered: a client's connection A
// closes while its replacement B is between logic's Connect and the
// node's bucket. A's end still finds A in the bucket and reports it gone;
// that report must not delete B's registration, or B is offline to every
// push by key until its next forwarded heartbeat (~200 s). It did in ~6%
// of real reconnects, because a disconnect matched the session by mid and
// server alone.
func TestReconnectRaceKeepsNewSessionRegistered(t *testing.T) {
	reg := memory.New(time.Minute, time.Minute)
	logic := &racingLogic{
		fakeLogic:     &fakeLogic{disconnects: map[string]int{}, rooms: map[string]int32{}},
		reg:           reg,
		bRegistered:   make(chan struct{}),
		aDisconnected: make(chan struct{}),
	}
	n := startNodeWithLogic(t, logic)
	cl := claims{Mid: 1, Key: "racekey"}
	a := n.connect(t, "ws", cl)

	bAuthed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		b, err := client.Dial(ctx, n.tcpAddr, client.Options{})
		if err != nil {
			bAuthed <- err
			return
		}
		t.Cleanup(func() { _ = b.Close() })
		tok, _ := json.Marshal(cl)
		_, err = b.Auth(tok)
		bAuthed <- err
	}()
	select {
	case <-logic.bRegistered:
	case <-time.After(wait):
		t.Fatal("B's Connect never reached logic")
	}
	_ = a.Close()
	if err := <-bAuthed; err != nil {
		t.Fatalf("B auth: %v", err)
	}
	select {
	case <-logic.aDisconnected:
	default:
		t.Fatal("A's disconnect was not reported while B's Connect was held")
	}
	logic.mu.Lock()
	conns := logic.conns
	logic.mu.Unlock()
	if len(conns) != 2 || conns[0] == 0 || conns[1] == 0 || conns[0] == conns[1] {
		t.Fatalf("Connect conns %v: want two distinct, non-zero connection ids", conns)
	}
	servers, _ := reg.ServersByKeys(context.Background(), []string{"racekey"})
	if servers["racekey"] != "n1" {
		t.Fatalf("racekey is offline in the registry while B is connected: %v", servers)
	}
}

// busyLogic refuses every connect as logic does a user over its connect
// rate or session cap.
type busyLogic struct{ *fakeLogic }

func (busyLogic) Connect(context.Context, *pb.ConnectReq, ...grpc.CallOption) (*pb.ConnectReply, error) {
	return nil, status.Error(codes.ResourceExhausted, "too many connects")
}

// TestConnectOverUserLimitCloses4029: logic's ResourceExhausted (the
// user's logic.connect_rate or max_sessions_per_mid) closes the connection
// with 4029 so the client backs off, not 4503 (try again at once).
func TestConnectOverUserLimitCloses4029(t *testing.T) {
	n := startNodeWithLogic(t, busyLogic{&fakeLogic{disconnects: map[string]int{}, rooms: map[string]int32{}}})
	c := n.dial(t, "ws", nil)
	_, err := c.Auth([]byte(`{"mid":1}`))
	if code := client.CloseCode(err); code != closeRateLimited {
		t.Fatalf("auth over the user's limit: %v (close %d), want close %d", err, code, closeRateLimited)
	}
}

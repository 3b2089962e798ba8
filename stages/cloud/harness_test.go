package cloud

import (
	"context"
	"encoding/json"
	"fmt"
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
	"google.golang.org/protobuf/proto"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
)

const wait = 20 * time.Second

// fakeLogic authenticates JSON tokens {"mid","key","rooms","accepts"} and
// records disconnects.
type fakeLogic struct {
	mu          sync.Mutex
	disconnects map[string]int
	rooms       map[string]int32 // what RenewOnline answers
	heartbeats  int
	renewals    int
	renewErr    error        // the last RenewOnline request that would not marshal
	lastNode    *pb.NodeInfo // the last RenewOnline's node
	// hist answers History and Tops and gives ConnectReply its tops; nil:
	// history is off (see order_test.go).
	hist *fakeHist
	// topsLag makes Connect's tops that much older than the history's:
	// read before pushes the node delivered during the handshake.
	topsLag uint64
}

// Connect grants like logic: rooms ending in '*' are patterns, granted
// but not joined; "any_room" is insecure-json's goim behaviour.
func (f *fakeLogic) Connect(_ context.Context, in *pb.ConnectReq, _ ...grpc.CallOption) (*pb.ConnectReply, error) {
	var tok struct {
		Mid     int64    `json:"mid"`
		Key     string   `json:"key"`
		Rooms   []string `json:"rooms"`
		Accepts []int32  `json:"accepts"`
		AnyRoom bool     `json:"any_room"`
		Recover bool     `json:"recover"`
		Acks    bool     `json:"acks"`
	}
	if err := json.Unmarshal(in.Token, &tok); err != nil || tok.Mid == 0 {
		return nil, status.Error(codes.Unauthenticated, "bad token")
	}
	if tok.Key == "" {
		tok.Key = fmt.Sprint("key-", tok.Mid)
	}
	reply := &pb.ConnectReply{Mid: tok.Mid, Key: tok.Key, Accepts: tok.Accepts, AnyRoom: tok.AnyRoom, AnyAccept: tok.AnyRoom,
		Recover: tok.Recover, Acks: tok.Acks}
	for _, r := range tok.Rooms {
		if strings.HasSuffix(r, "*") {
			reply.RoomGrants = append(reply.RoomGrants, r)
		} else {
			reply.Rooms = append(reply.Rooms, r)
		}
	}
	if f.hist != nil {
		reply.Tops = f.hist.tops(streamsOf(tok.Mid, reply.Rooms))
		f.mu.Lock()
		for _, t := range reply.Tops {
			t.Pos -= min(t.Pos, f.topsLag)
		}
		f.mu.Unlock()
		if tok.Acks {
			reply.Acked = f.hist.acked(pipeline.UserStream(tok.Mid))
		}
	}
	return reply, nil
}

func (f *fakeLogic) Disconnect(_ context.Context, in *pb.DisconnectReq, _ ...grpc.CallOption) (*pb.DisconnectReply, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.disconnects[in.Key]++
	return &pb.DisconnectReply{Has: true}, nil
}

func (f *fakeLogic) disconnected(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.disconnects[key]
}

func (f *fakeLogic) Heartbeat(context.Context, *pb.HeartbeatReq, ...grpc.CallOption) (*pb.HeartbeatReply, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.heartbeats++
	return &pb.HeartbeatReply{}, nil
}

// RenewOnline marshals the request as gRPC would: a string that is not
// UTF-8 fails the call.
func (f *fakeLogic) RenewOnline(_ context.Context, in *pb.RenewOnlineReq, _ ...grpc.CallOption) (*pb.RenewOnlineReply, error) {
	_, err := proto.Marshal(in)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.renewals++
	f.lastNode = in.GetNode()
	if err != nil {
		f.renewErr = err
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &pb.RenewOnlineReply{AllRoomCount: f.rooms}, nil
}

// calls returns the heartbeats and renewals received and the last
// renewal that would not marshal.
func (f *fakeLogic) calls() (heartbeats, renewals int, renewErr error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.heartbeats, f.renewals, f.renewErr
}

func (f *fakeLogic) Receive(context.Context, *pb.ReceiveReq, ...grpc.CallOption) (*pb.ReceiveReply, error) {
	return nil, status.Error(codes.Unimplemented, "")
}

func (f *fakeLogic) Nodes(context.Context, *pb.NodesReq, ...grpc.CallOption) (*pb.NodesReply, error) {
	return nil, status.Error(codes.Unimplemented, "")
}

// node is a cloud stage on real loopback listeners, driven directly through
// its gRPC service implementation.
type node struct {
	st       *Stage
	rpc      *grpcServer
	logic    *fakeLogic
	upstream *gochannel.GoChannel
	tcpAddr  string
	wsURL    string
	tcpLn    net.Listener
	ws       *httptest.Server
}

func startNode(t testing.TB, edit func(*config.Cloud)) *node {
	t.Helper()
	return startNodeLogged(t, edit, slog.New(slog.DiscardHandler))
}

// startNodeLogged is startNode logging to logger.
func startNodeLogged(t testing.TB, edit func(*config.Cloud), logger *slog.Logger) *node {
	t.Helper()
	return startNodeWith(t, edit, logger, nil)
}

// startNodeWith is startNodeLogged with recovery's bounds (nil: the
// defaults).
func startNodeWith(t testing.TB, edit func(*config.Cloud), logger *slog.Logger, rb *recoverBounds) *node {
	t.Helper()
	cfg := config.Default().Cloud
	edit(&cfg)
	logic := &fakeLogic{disconnects: map[string]int{}, rooms: map[string]int32{}}
	up := gochannel.NewGoChannel(gochannel.Config{OutputChannelBuffer: 64}, nil)
	st := New(cfg, Options{Self: &pb.NodeInfo{Id: "n1", GrpcAddr: "127.0.0.1:1"}, Logic: logic, Upstream: up, UpstreamTopic: "up", Logger: logger,
		recoverBounds: rb})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = st.ServeTCP(ln) }()
	ws := httptest.NewUnstartedServer(st.WSHandler())
	ws.Listener = st.Listener(ws.Listener)
	ws.Start()
	n := &node{st: st, rpc: &grpcServer{s: st}, logic: logic, upstream: up, tcpAddr: ln.Addr().String(),
		wsURL: "ws" + strings.TrimPrefix(ws.URL, "http") + "/sub", tcpLn: ln, ws: ws}
	t.Cleanup(func() {
		_ = ln.Close()
		ws.CloseClientConnections()
		ws.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = st.Drain(ctx)
		_ = up.Close()
	})
	return n
}

type claims struct {
	Mid     int64    `json:"mid"`
	Key     string   `json:"key,omitempty"`
	Rooms   []string `json:"rooms,omitempty"`
	Accepts []int32  `json:"accepts,omitempty"`
	AnyRoom bool     `json:"any_room,omitempty"`
	Recover bool     `json:"recover,omitempty"`
	Acks    bool     `json:"acks,omitempty"`
}

// dial connects over "ws" or "tcp"; dialer tunes the client socket.
func (n *node) dial(t testing.TB, transport string, dialer *net.Dialer) *client.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := client.Dial(ctx, n.target(transport), client.Options{Dialer: dialer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetReadDeadline(time.Now().Add(wait))
	return c
}

// target is the address a client of transport ("ws" or "tcp") dials.
func (n *node) target(transport string) string {
	if transport == "ws" {
		return n.wsURL
	}
	return n.tcpAddr
}

func (n *node) connect(t testing.TB, transport string, cl claims) *client.Conn {
	t.Helper()
	c := n.dial(t, transport, nil)
	tok, _ := json.Marshal(cl)
	if _, err := c.Auth(tok); err != nil {
		t.Fatalf("auth: %v", err)
	}
	return c
}

func (n *node) room(t testing.TB, room string, op int32, body []byte) int32 {
	t.Helper()
	r, err := n.rpc.BroadcastRoom(context.Background(), &pb.BroadcastRoomReq{RoomId: room, Proto: &pb.Proto{Op: op, Body: body}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Delivered
}

func broadcastReq(op int32, body string) *pb.BroadcastReq {
	return &pb.BroadcastReq{Proto: &pb.Proto{Op: op, Body: []byte(body)}}
}

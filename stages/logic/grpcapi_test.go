package logic

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

const apiTestKey = "api-test-key-0123456789"

// grpcAPI is the push API over gRPC on a loopback port, in front of a
// memory registry with key k7 of mid 7 online on node n1, positions from
// a fake history, and pub as the broker.
type grpcAPI struct {
	client pb.PushServiceClient
	st     *Stage
	hist   *fakeHistory
}

func newGRPCAPI(t *testing.T, pub message.Publisher, edit func(*config.Logic)) *grpcAPI {
	t.Helper()
	cfg := config.Default().Logic
	cfg.Auth.JWTSecret = "s"
	cfg.APIKeys = []string{apiTestKey}
	if edit != nil {
		edit(&cfg)
	}
	reg := memory.New(time.Minute, time.Minute)
	ctx := context.Background()
	if _, err := reg.RenewNode(ctx, &pb.NodeInfo{Id: "n1", Host: "10.0.0.1", TcpPort: 3101, WsPort: 3102, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := reg.AddSession(ctx, 7, "k7", "n1", 0); err != nil {
		t.Fatal(err)
	}
	hist := newFakeHistory()
	st, err := New(cfg, Options{Registry: reg, Publisher: pub, PushTopics: []string{"push"}, Replies: memory.NewReplies(time.Minute),
		History: hist, Heartbeat: 30 * time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(st.APIServerOptions()...)
	st.RegisterAPI(srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &grpcAPI{client: pb.NewPushServiceClient(conn), st: st, hist: hist}
}

func withKey(key string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+key)
}

func roomPush(room, msg string) *pb.PushRequest {
	return &pb.PushRequest{Operation: 1000, Msg: []byte(msg), Target: &pb.PushRequest_Room{Room: &pb.Room{Type: "live", Room: room}}}
}

// TestGRPCAPIRefusesWithoutTheKey: every method is refused with
// UNAUTHENTICATED without the key, with another key or scheme, and the
// push is not published.
func TestGRPCAPIRefusesWithoutTheKey(t *testing.T) {
	pub := &recordingPublisher{}
	a := newGRPCAPI(t, pub, nil)
	for name, ctx := range map[string]context.Context{
		"no key":     context.Background(),
		"wrong key":  withKey("nope"),
		"basic auth": metadata.AppendToOutgoingContext(context.Background(), "authorization", "Basic "+apiTestKey),
		"two values": metadata.AppendToOutgoingContext(withKey(apiTestKey), "authorization", "Bearer nope"),
	} {
		t.Run(name, func(t *testing.T) {
			_, err := a.client.Push(ctx, roomPush("1", "x"))
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("Push: %v, want Unauthenticated", err)
			}
			_, err = a.client.PushBatch(ctx, &pb.PushBatchRequest{Pushes: []*pb.PushRequest{roomPush("1", "x")}})
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("PushBatch: %v, want Unauthenticated", err)
			}
			s, err := a.client.PushStream(ctx)
			if err == nil {
				_ = s.Send(&pb.StreamPush{Id: 1, Push: roomPush("1", "x")})
				_, err = s.Recv()
			}
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("PushStream: %v, want Unauthenticated", err)
			}
		})
	}
	if n := pub.count(); n != 0 {
		t.Fatalf("%d messages published by refused calls", n)
	}
}

// TestGRPCAPIPush: a valid push is published and answered as the HTTP
// API would; an invalid one gets the code of its HTTP status with the
// field named; an idempotency key replays.
func TestGRPCAPIPush(t *testing.T) {
	pub := &recordingPublisher{}
	a := newGRPCAPI(t, pub, nil)
	ctx := withKey(apiTestKey)
	reply, err := a.client.Push(ctx, &pb.PushRequest{Operation: 1000, Msg: []byte("hi"),
		Target: &pb.PushRequest_Keys{Keys: &pb.Keys{Keys: []string{"k7", "gone"}}}, IdempotencyKey: "o-1"})
	if err != nil {
		t.Fatal(err)
	}
	if reply.MsgId == "" || reply.Online != 1 || len(reply.OfflineKeys) != 1 || len(reply.Positions) != 1 || reply.Positions[0].Stream != "user:7" {
		t.Fatalf("reply %v", reply)
	}
	again, err := a.client.Push(ctx, &pb.PushRequest{Operation: 1000, Msg: []byte("hi"),
		Target: &pb.PushRequest_Keys{Keys: &pb.Keys{Keys: []string{"gone", "k7"}}}, IdempotencyKey: "o-1"})
	if err != nil || !again.Replayed || again.MsgId != reply.MsgId {
		t.Fatalf("retry: %v %v, want replayed %s", again, err, reply.MsgId)
	}
	_, err = a.client.Push(ctx, &pb.PushRequest{Operation: 1000, Msg: []byte("other"),
		Target: &pb.PushRequest_Keys{Keys: &pb.Keys{Keys: []string{"k7"}}}, IdempotencyKey: "o-1"})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("key reused for other content: %v, want FailedPrecondition", err)
	}
	for _, tt := range []struct {
		name string
		r    *pb.PushRequest
		says string
	}{
		{"no target", &pb.PushRequest{Operation: 1000}, "target"},
		{"low operation", &pb.PushRequest{Operation: 7, Target: &pb.PushRequest_Mids{Mids: &pb.Mids{Mids: []int64{7}}}}, "operation"},
		{"no mids", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_Mids{Mids: &pb.Mids{}}}, "mids"},
		{"mid 0", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_Mids{Mids: &pb.Mids{Mids: []int64{0}}}}, "mids"},
		{"bad room", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_Room{Room: &pb.Room{Type: "live", Room: "a\x01"}}}, "room"},
		{"nil room", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_Room{}}, "type"},
		{"bad key", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_Keys{Keys: &pb.Keys{Keys: []string{strings.Repeat("k", 300)}}}}, "keys"},
		{"too large", &pb.PushRequest{Operation: 1000, Msg: make([]byte, 5000), Target: &pb.PushRequest_All{All: &pb.All{}}}, "msg"},
		{"long idempotency key", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_All{All: &pb.All{}}, IdempotencyKey: strings.Repeat("i", 256)}, "idempotency_key"},
		{"negative speed", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_All{All: &pb.All{Speed: -1}}}, "speed"},
		{"request id with a control character", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_All{All: &pb.All{}}, RequestId: "r\x01"}, "request_id"},
		{"request id too long", &pb.PushRequest{Operation: 1000, Target: &pb.PushRequest_All{All: &pb.All{}}, RequestId: strings.Repeat("r", 256)}, "request_id"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.client.Push(ctx, tt.r)
			if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), tt.says) {
				t.Fatalf("%v, want InvalidArgument naming %s", err, tt.says)
			}
		})
	}
	if n := pub.count(); n != 1 {
		t.Fatalf("%d messages published, want 1", n)
	}
	// PushBatch: each answered in order, the whole refused only when
	// empty or over the item limit.
	br, err := a.client.PushBatch(ctx, &pb.PushBatchRequest{Pushes: []*pb.PushRequest{roomPush("1", "a"), {Operation: 1}, roomPush("1", "b")}})
	if err != nil {
		t.Fatal(err)
	}
	if c := []codes.Code{codes.Code(br.Results[0].Code), codes.Code(br.Results[1].Code), codes.Code(br.Results[2].Code)}; c[0] != codes.OK || c[1] != codes.InvalidArgument || c[2] != codes.OK ||
		br.Results[2].Reply.Positions[0].Pos != br.Results[0].Reply.Positions[0].Pos+1 {
		t.Fatalf("batch results %v", br.Results)
	}
	if _, err := a.client.PushBatch(ctx, &pb.PushBatchRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty batch: %v", err)
	}
}

// TestGRPCAPIStreamBrokerDown: with the broker refusing, every push of a
// stream is answered UNAVAILABLE, each with its id: none is dropped.
func TestGRPCAPIStreamBrokerDown(t *testing.T) {
	pub := &recordingPublisher{fail: errors.New("broker gone")}
	a := newGRPCAPI(t, pub, func(c *config.Logic) { c.APIStreamWindow = 16 })
	s, err := a.client.PushStream(withKey(apiTestKey))
	if err != nil {
		t.Fatal(err)
	}
	const n = 500
	go func() {
		for i := range n {
			if err := s.Send(&pb.StreamPush{Id: uint64(i), Push: roomPush(fmt.Sprint(i%5), "x")}); err != nil {
				return
			}
		}
		_ = s.CloseSend()
	}()
	seen := map[uint64]bool{}
	for {
		r, err := s.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if codes.Code(r.Result.Code) != codes.Unavailable || seen[r.Id] {
			t.Fatalf("result %v (seen before: %v)", r, seen[r.Id])
		}
		seen[r.Id] = true
	}
	if len(seen) != n {
		t.Fatalf("%d results for %d pushes", len(seen), n)
	}
}

// TestGRPCAPIStreamOrderAndShutdown: a stream's pushes to one room take
// their positions in the order sent; StopStreams ends the stream with
// UNAVAILABLE once what it received is answered.
func TestGRPCAPIStreamOrderAndShutdown(t *testing.T) {
	pub := &recordingPublisher{}
	a := newGRPCAPI(t, pub, func(c *config.Logic) { c.APIStreamWindow = 32 })
	s, err := a.client.PushStream(withKey(apiTestKey))
	if err != nil {
		t.Fatal(err)
	}
	const n = 2000
	go func() {
		for i := range n {
			if err := s.Send(&pb.StreamPush{Id: uint64(i), Push: roomPush("order", fmt.Sprint(i))}); err != nil {
				return
			}
		}
	}()
	pos := make([]uint64, n)
	for range n {
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.Result.Code != 0 {
			t.Fatalf("push %d: %v", r.Id, r.Result)
		}
		pos[r.Id] = r.Result.Reply.Positions[0].Pos
	}
	for i := range pos {
		if pos[i] != uint64(i)+1 {
			t.Fatalf("push %d at position %d, want %d", i, pos[i], i+1)
		}
	}
	a.st.StopStreams()
	if _, err := s.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("after StopStreams: %v, want Unavailable", err)
	}
}

// TestGRPCAPIStreamBounds: a push over a single push's size is answered
// INVALID_ARGUMENT without running and the stream goes on; a key revoked
// (by SIGHUP) ends the streams it opened at their next batch.
func TestGRPCAPIStreamBounds(t *testing.T) {
	pub := &recordingPublisher{}
	a := newGRPCAPI(t, pub, nil)
	s, err := a.client.PushStream(withKey(apiTestKey))
	if err != nil {
		t.Fatal(err)
	}
	huge := &pb.PushRequest{Operation: 1000, Msg: make([]byte, 100<<10), Target: &pb.PushRequest_All{All: &pb.All{}}}
	if err := s.Send(&pb.StreamPush{Id: 1, Push: huge}); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&pb.StreamPush{Id: 2, Push: roomPush("1", "ok")}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []struct {
		id   uint64
		code codes.Code
	}{{1, codes.InvalidArgument}, {2, codes.OK}} {
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.Id != want.id || codes.Code(r.Result.Code) != want.code {
			t.Fatalf("result %v, want id %d code %v", r, want.id, want.code)
		}
	}
	cfg := a.st.cfg
	cfg.APIKeys = []string{"the-new-key-0123456789"}
	a.st.access.Store(newAccess(cfg))
	if err := s.Send(&pb.StreamPush{Id: 3, Push: roomPush("1", "after")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("after the key was revoked: %v, want Unauthenticated", err)
	}
	if n := pub.count(); n != 1 {
		t.Fatalf("%d published, want 1", n)
	}
}

// TestGRPCAPIRequestIDMetadata: x-request-id in a call's metadata is held
// to the HTTP header's rules: once, at most 255 bytes. (Metadata that is
// not printable ASCII, and protobuf strings that are not UTF-8, are
// refused by gRPC itself before a handler runs.)
func TestGRPCAPIRequestIDMetadata(t *testing.T) {
	pub := &recordingPublisher{}
	a := newGRPCAPI(t, pub, nil)
	for name, ids := range map[string][]string{
		"twice":    {"a", "b"},
		"too long": {strings.Repeat("r", 256)},
	} {
		t.Run(name, func(t *testing.T) {
			ctx := withKey(apiTestKey)
			for _, id := range ids {
				ctx = metadata.AppendToOutgoingContext(ctx, "x-request-id", id)
			}
			if _, err := a.client.Push(ctx, roomPush("1", "x")); status.Code(err) != codes.InvalidArgument {
				t.Fatalf("Push: %v, want InvalidArgument", err)
			}
			s, err := a.client.PushStream(ctx)
			if err == nil {
				_ = s.Send(&pb.StreamPush{Id: 1, Push: roomPush("1", "x")})
				_, err = s.Recv()
			}
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("PushStream: %v, want InvalidArgument", err)
			}
		})
	}
	if n := pub.count(); n != 0 {
		t.Fatalf("%d published", n)
	}
}

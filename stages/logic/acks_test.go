package logic

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// TestConnectReplyAcks: ConnectReply says whether the client opted in
// (recover) and whether its user stream keeps acks, and gives an
// opted-in client with acks on its acknowledged position — for a fresh
// stream its epoch at position 0, so recovering from there gives
// everything kept. goim's clients cost no cursor read.
func TestConnectReplyAcks(t *testing.T) {
	ctx := context.Background()
	connect := func(s *grpcServer, body string) *pb.ConnectReply {
		t.Helper()
		r, err := s.Connect(ctx, &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Conn: 1, Token: []byte(body)})
		if err != nil {
			t.Fatalf("connect %s: %v", body, err)
		}
		return r
	}
	hist := memory.NewHistory(pipeline.HistoryCaps{})
	s := historyServer(t, hist, slog.New(slog.DiscardHandler))

	r := connect(s, `{"mid":7,"key":"k7","recover":true}`)
	if !r.Recover || !r.Acks || r.Acked == nil {
		t.Fatalf("opted-in connect with acks on: recover %v acks %v acked %v", r.Recover, r.Acks, r.Acked)
	}
	if r.Acked.Stream != "user:7" || r.Acked.Epoch == "" || r.Acked.Pos != 0 {
		t.Fatalf("fresh stream acked %v, want user:7, its epoch, 0", r.Acked)
	}
	if r.Tops[0].Epoch != r.Acked.Epoch {
		t.Fatalf("acked epoch %q is not the stream's %q", r.Acked.Epoch, r.Tops[0].Epoch)
	}

	// Messages come, some are acknowledged: the next connect starts there.
	user := []string{"user:7"}
	for i := range 5 {
		if _, err := hist.Append(ctx, user, pipeline.HistoryEntry{ID: fmt.Sprint(i), Op: 1000, Body: []byte("m"), At: time.Now()},
			func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: time.Hour} }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Ack(ctx, &pb.AckReq{Mid: 7, Epoch: r.Acked.Epoch, Pos: 3}); err != nil {
		t.Fatal(err)
	}
	r2 := connect(s, `{"mid":7,"key":"k7b","recover":true}`)
	if r2.Acked.GetEpoch() != r.Acked.Epoch || r2.Acked.GetPos() != 3 {
		t.Fatalf("acked after acking 3: %v", r2.Acked)
	}

	for _, c := range []struct {
		name, body        string
		acksOn            bool
		recover, acks, at bool
	}{
		{"not opted in", `{"mid":7,"key":"k"}`, true, false, true, false},
		{"goim guest", `{"mid":0,"key":"g","recover":true}`, true, true, false, false},
		{"acks off", `{"mid":7,"key":"k","recover":true}`, false, true, false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := historyServer(t, hist, slog.New(slog.DiscardHandler))
			s.acks = c.acksOn
			r := connect(s, c.body)
			if r.Recover != c.recover || r.Acks != c.acks || (r.Acked != nil) != c.at {
				t.Fatalf("recover %v acks %v acked %v; want %v %v %v", r.Recover, r.Acks, r.Acked, c.recover, c.acks, c.at)
			}
		})
	}
	// Without history there is nothing to ack.
	off := historyServer(t, nil, slog.New(slog.DiscardHandler))
	if r := connect(off, `{"mid":7,"key":"k","recover":true}`); !r.Recover || r.Acks || r.Acked != nil {
		t.Fatalf("history off: recover %v acks %v acked %v", r.Recover, r.Acks, r.Acked)
	}
	// A store failing to read the cursor leaves it out; the connect holds.
	failing := historyServer(t, &stubHistory{err: fmt.Errorf("down")}, slog.New(slog.DiscardHandler))
	if r := connect(failing, `{"mid":7,"key":"k","recover":true}`); !r.Acks {
		t.Fatalf("failing store: acks %v", r.Acks)
	}
}

// TestAckRPC: Ack against a real store is cumulative and forward only;
// a foreign epoch is FailedPrecondition, a position past the top
// OutOfRange, anything malformed InvalidArgument, and with
// history.user.acks off every ack is FailedPrecondition and stores
// nothing.
func TestAckRPC(t *testing.T) {
	ctx := context.Background()
	hist := memory.NewHistory(pipeline.HistoryCaps{})
	s := historyServer(t, hist, slog.New(slog.DiscardHandler))
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: time.Hour} }
	var epoch string
	for i := range 10 {
		ps, err := hist.Append(ctx, []string{"user:9"}, pipeline.HistoryEntry{ID: fmt.Sprint(i), Op: 1000, At: time.Now()}, limit)
		if err != nil {
			t.Fatal(err)
		}
		epoch = ps[0].Epoch
	}
	acked := func() uint64 {
		p, err := hist.Acked(ctx, "user:9")
		if err != nil {
			t.Fatal(err)
		}
		return p.Pos
	}
	steps := []struct {
		name  string
		req   *pb.AckReq
		want  codes.Code
		after uint64 // the cursor after the call
	}{
		{"forward", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 4}, codes.OK, 4},
		{"same again", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 4}, codes.OK, 4},
		{"back is a no-op", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 2}, codes.OK, 4},
		{"cumulative jump", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 9}, codes.OK, 9},
		{"the top", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 10}, codes.OK, 10},
		{"past the top", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 11}, codes.OutOfRange, 10},
		{"far past the top", &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 1 << 53}, codes.OutOfRange, 10},
		{"foreign epoch", &pb.AckReq{Mid: 9, Epoch: "not" + epoch, Pos: 1}, codes.FailedPrecondition, 10},
		{"epoch with a bad character", &pb.AckReq{Mid: 9, Epoch: "e\n", Pos: 1}, codes.InvalidArgument, 10},
		{"position 0", &pb.AckReq{Mid: 9, Epoch: epoch}, codes.InvalidArgument, 10},
		{"guest", &pb.AckReq{Mid: 0, Epoch: epoch, Pos: 1}, codes.InvalidArgument, 10},
		{"a user never seen", &pb.AckReq{Mid: 10, Epoch: epoch, Pos: 1}, codes.FailedPrecondition, 10},
	}
	for _, st := range steps {
		_, err := s.Ack(ctx, st.req)
		if got := status.Code(err); got != st.want {
			t.Fatalf("%s: %v (%v), want %v", st.name, got, err, st.want)
		}
		if got := acked(); got != st.after {
			t.Fatalf("%s: cursor %d, want %d", st.name, got, st.after)
		}
	}

	// Acks off: refused before the store, which keeps its cursor.
	off := historyServer(t, hist, slog.New(slog.DiscardHandler))
	off.acks = false
	stub := &stubHistory{}
	offStub := historyServer(t, stub, slog.New(slog.DiscardHandler))
	offStub.acks = false
	for _, srv := range []*grpcServer{off, offStub} {
		if _, err := srv.Ack(ctx, &pb.AckReq{Mid: 9, Epoch: epoch, Pos: 10}); status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("acks off: %v, want FailedPrecondition", err)
		}
	}
	if stub.callCount() != 0 {
		t.Fatalf("acks off reached the store %d times", stub.callCount())
	}
}

// TestAcksConfigReachesConnect: history.user.acks in the stage's options
// is what Connect tells the node.
func TestAcksConfigReachesConnect(t *testing.T) {
	limits := config.Default().History
	for _, on := range []bool{false, true} {
		limits.User.Acks = on
		cfg := config.Default().Logic
		cfg.Auth = config.Auth{Mode: config.AuthInsecureJSON}
		st, err := New(cfg, Options{Registry: memory.New(time.Minute, time.Minute), PushTopics: []string{"push"}, History: memory.NewHistory(pipeline.HistoryCaps{}),
			HistoryLimits: limits, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		r, err := st.grpc.Connect(context.Background(), &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Conn: 1, Token: []byte(`{"mid":7,"key":"k","recover":true}`)})
		if err != nil {
			t.Fatal(err)
		}
		if r.Acks != on || (r.Acked != nil) != on {
			t.Fatalf("history.user.acks %v: reply acks %v acked %v", on, r.Acks, r.Acked)
		}
	}
}

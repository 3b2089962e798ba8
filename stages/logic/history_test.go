package logic

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// stubHistory answers with what it is set to and records what reached it:
// a request refused by validation must never reach the store.
type stubHistory struct {
	mu      sync.Mutex
	calls   int
	max     int // the last Since's max
	entries []pipeline.HistoryEntry
	top     pipeline.StreamPos
	err     error
}

func (h *stubHistory) Append(context.Context, []string, pipeline.HistoryEntry, func(string) pipeline.StreamLimit) ([]pipeline.StreamPos, error) {
	return nil, errors.New("not used")
}

func (h *stubHistory) Since(_ context.Context, stream, _ string, _ uint64, max int) ([]pipeline.HistoryEntry, pipeline.StreamPos, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls++
	h.max = max
	top := h.top
	top.Stream = stream
	return h.entries, top, h.err
}

func (h *stubHistory) Tops(_ context.Context, streams []string) ([]pipeline.StreamPos, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls++
	if h.err != nil {
		return nil, h.err
	}
	out := make([]pipeline.StreamPos, len(streams))
	for i, s := range streams {
		out[i] = pipeline.StreamPos{Stream: s, Epoch: h.top.Epoch, Pos: h.top.Pos}
	}
	return out, nil
}

func (h *stubHistory) Ack(context.Context, string, string, uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls++
	return h.err
}

func (h *stubHistory) Acked(context.Context, string) (pipeline.StreamPos, error) {
	return pipeline.StreamPos{}, nil
}

func (h *stubHistory) Void(context.Context, []pipeline.StreamPos) error {
	return errors.New("not used")
}

func (h *stubHistory) callCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls
}

func historyServer(t *testing.T, h pipeline.History, logger *slog.Logger) *grpcServer {
	t.Helper()
	s := connectServer(t, func(*config.Logic) {})
	s.logger = logger
	s.historyFail = pipeline.NewRateLog(logger, slog.LevelError, logEvery)
	if h != nil {
		s.history = h
	}
	s.acks = true // history.user.acks: the Ack RPC's tests need it on
	return s
}

// TestHistoryRPCValidation: every field a node sends is checked before the
// store sees it; the hostile ones (huge, odd characters, out of range)
// are InvalidArgument and cost no store call.
func TestHistoryRPCValidation(t *testing.T) {
	ctx := context.Background()
	long := strings.Repeat("a", 10_000)
	manyStreams := make([]string, maxTopsStreams+1)
	for i := range manyStreams {
		manyStreams[i] = "user:1"
	}
	cases := []struct {
		name string
		call func(*grpcServer) error
		want codes.Code
	}{
		{"history room", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "room:live://1", Epoch: "e1", After: 3, Limit: 10})
			return err
		}, codes.OK},
		{"history user", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:42", Epoch: "e1", After: 3})
			return err
		}, codes.OK},
		{"history everything without epoch", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:42"})
			return err
		}, codes.OK},
		{"history empty stream", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history unknown kind", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "chan:1", Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history bad room", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "room:live://a\x00b", Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history huge room", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "room:live://" + long, Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history user not digits", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:+42", Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history user negative", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:-1", Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history user empty", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:", Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history user past int64", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:9999999999999999999", Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history user many digits", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:" + strings.Repeat("1", 500), Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
		{"history epoch missing with a position", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:1", After: 5})
			return err
		}, codes.InvalidArgument},
		{"history epoch too long", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:1", Epoch: long, After: 5})
			return err
		}, codes.InvalidArgument},
		{"history epoch odd characters", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:1", Epoch: "e1\n{}", After: 5})
			return err
		}, codes.InvalidArgument},
		{"history negative limit", func(s *grpcServer) error {
			_, err := s.History(ctx, &pb.HistoryReq{Stream: "user:1", Epoch: "e1", Limit: -1})
			return err
		}, codes.InvalidArgument},
		{"tops", func(s *grpcServer) error {
			_, err := s.Tops(ctx, &pb.TopsReq{Streams: []string{"user:1", "room:live://1"}})
			return err
		}, codes.OK},
		{"tops too many streams", func(s *grpcServer) error {
			_, err := s.Tops(ctx, &pb.TopsReq{Streams: manyStreams})
			return err
		}, codes.InvalidArgument},
		{"tops one bad stream", func(s *grpcServer) error {
			_, err := s.Tops(ctx, &pb.TopsReq{Streams: []string{"user:1", "room:"}})
			return err
		}, codes.InvalidArgument},
		{"ack", func(s *grpcServer) error {
			_, err := s.Ack(ctx, &pb.AckReq{Mid: 1, Epoch: "e1", Pos: 1})
			return err
		}, codes.OK},
		{"ack guest", func(s *grpcServer) error {
			_, err := s.Ack(ctx, &pb.AckReq{Mid: 0, Epoch: "e1", Pos: 1})
			return err
		}, codes.InvalidArgument},
		{"ack negative mid", func(s *grpcServer) error {
			_, err := s.Ack(ctx, &pb.AckReq{Mid: -5, Epoch: "e1", Pos: 1})
			return err
		}, codes.InvalidArgument},
		{"ack no epoch", func(s *grpcServer) error {
			_, err := s.Ack(ctx, &pb.AckReq{Mid: 1, Pos: 1})
			return err
		}, codes.InvalidArgument},
		{"ack bad epoch", func(s *grpcServer) error {
			_, err := s.Ack(ctx, &pb.AckReq{Mid: 1, Epoch: long, Pos: 1})
			return err
		}, codes.InvalidArgument},
		{"ack position 0", func(s *grpcServer) error {
			_, err := s.Ack(ctx, &pb.AckReq{Mid: 1, Epoch: "e1"})
			return err
		}, codes.InvalidArgument},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := &stubHistory{top: pipeline.StreamPos{Epoch: "e1", Pos: 9}}
			s := historyServer(t, h, slog.New(slog.DiscardHandler))
			err := c.call(s)
			if got := status.Code(err); got != c.want {
				t.Fatalf("got %v (%v), want %v", got, err, c.want)
			}
			if c.want == codes.InvalidArgument && h.callCount() != 0 {
				t.Fatalf("a refused request reached the store %d times", h.callCount())
			}
			// Without a store every RPC says history is off.
			off := historyServer(t, nil, slog.New(slog.DiscardHandler))
			if got := status.Code(c.call(off)); got != codes.FailedPrecondition {
				t.Fatalf("without history: %v, want FailedPrecondition", got)
			}
		})
	}
}

// TestHistoryRPCAnswers: the store's errors become the reply's
// unrecoverable reason (the caller's business), its failures Unavailable
// logged once per interval, and limit is capped.
func TestHistoryRPCAnswers(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		err  error
		want string
	}{
		{pipeline.ErrEpochChanged, "epoch"},
		{fmt.Errorf("read: %w", pipeline.ErrTrimmed), "trimmed"},
		{pipeline.ErrFuturePosition, "future"},
	} {
		h := &stubHistory{top: pipeline.StreamPos{Epoch: "e2", Pos: 7}, err: c.err}
		s := historyServer(t, h, slog.New(slog.DiscardHandler))
		r, err := s.History(ctx, &pb.HistoryReq{Stream: "user:1", Epoch: "e1", After: 3})
		if err != nil || r.Unrecoverable != c.want || len(r.Entries) != 0 {
			t.Fatalf("%v: reply %v err %v, want unrecoverable %q", c.err, r, err, c.want)
		}
		if r.Top.GetEpoch() != "e2" || r.Top.GetPos() != 7 || r.Top.GetStream() != "user:1" {
			t.Fatalf("%v: top %v, want user:1 e2 7", c.err, r.Top)
		}
	}

	at := time.UnixMilli(1_700_000_000_123)
	h := &stubHistory{top: pipeline.StreamPos{Epoch: "e1", Pos: 5},
		entries: []pipeline.HistoryEntry{{Pos: 4, ID: "a", Op: 1000, Body: []byte("x"), At: at}, {Pos: 5, ID: "b", Op: 1001, Body: []byte("y"), At: at}}}
	s := historyServer(t, h, slog.New(slog.DiscardHandler))
	r, err := s.History(ctx, &pb.HistoryReq{Stream: "room:live://1", Epoch: "e1", After: 3, Limit: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Entries) != 2 || r.Entries[0].Pos != 4 || r.Entries[1].Id != "b" || string(r.Entries[1].Body) != "y" || r.Entries[0].AtUnixMs != at.UnixMilli() || r.Unrecoverable != "" {
		t.Fatalf("entries %v", r)
	}
	if h.max != maxHistoryLimit {
		t.Fatalf("limit 2^30 reached the store as %d, want the cap %d", h.max, maxHistoryLimit)
	}

	var buf bytes.Buffer
	h = &stubHistory{err: errors.New("redis down")}
	s = historyServer(t, h, slog.New(slog.NewTextHandler(&buf, nil)))
	for range 100 {
		if _, err := s.History(ctx, &pb.HistoryReq{Stream: "user:1", Epoch: "e1", After: 1}); status.Code(err) != codes.Unavailable {
			t.Fatalf("store failure: %v, want Unavailable", err)
		}
		if _, err := s.Tops(ctx, &pb.TopsReq{Streams: []string{"user:1"}}); status.Code(err) != codes.Unavailable {
			t.Fatalf("store failure: %v, want Unavailable", err)
		}
	}
	if n := strings.Count(buf.String(), "level=ERROR"); n != 1 {
		t.Fatalf("200 failed calls logged %d lines, want 1:\n%s", n, buf.String())
	}

	for _, c := range []struct {
		err  error
		want codes.Code
	}{
		{nil, codes.OK},
		{pipeline.ErrEpochChanged, codes.FailedPrecondition},
		{pipeline.ErrFuturePosition, codes.OutOfRange},
		{errors.New("down"), codes.Unavailable},
	} {
		s := historyServer(t, &stubHistory{err: c.err}, slog.New(slog.DiscardHandler))
		if _, err := s.Ack(ctx, &pb.AckReq{Mid: 3, Epoch: "e1", Pos: 2}); status.Code(err) != c.want {
			t.Fatalf("ack with store error %v: %v, want %v", c.err, err, c.want)
		}
	}
}

// TestConnectReplyTops: a connect's reply carries the tops of the user's
// stream and of its rooms; a failing store leaves them out without
// failing the connect.
func TestConnectReplyTops(t *testing.T) {
	ctx := context.Background()
	h := &stubHistory{top: pipeline.StreamPos{Epoch: "e1", Pos: 12}}
	s := historyServer(t, h, slog.New(slog.DiscardHandler))
	tok := []byte(`{"mid":7,"key":"k7","room_id":"live://1"}`)
	r, err := s.Connect(ctx, &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Conn: 1, Token: tok})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"user:7"}
	for _, room := range r.Rooms {
		want = append(want, "room:"+room)
	}
	if len(want) != 2 || len(r.Tops) != len(want) {
		t.Fatalf("tops %v, want %v", r.Tops, want)
	}
	for i, top := range r.Tops {
		if top.Stream != want[i] || top.Epoch != "e1" || top.Pos != 12 {
			t.Fatalf("top %d: %v, want %s e1 12", i, top, want[i])
		}
	}

	h.err = errors.New("down")
	r, err = s.Connect(ctx, &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Conn: 2, Token: tok})
	if err != nil || len(r.Tops) != 0 {
		t.Fatalf("connect with a failing store: %v tops %v, want success without tops", err, r.GetTops())
	}
	off := historyServer(t, nil, slog.New(slog.DiscardHandler))
	r, err = off.Connect(ctx, &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Conn: 3, Token: tok})
	if err != nil || len(r.Tops) != 0 {
		t.Fatalf("connect without history: %v tops %v", err, r.GetTops())
	}
}

package logic

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// sizeZeroLimits keeps positions only for chat rooms and user streams;
// live rooms keep the default.
func sizeZeroLimits() config.History {
	limits := config.Default().History
	limits.User = config.StreamLimit{Size: 0, TTL: time.Hour}
	limits.Rooms = map[string]config.StreamLimit{"chat": {Size: 0, TTL: time.Hour}, "live": {Size: 100, TTL: time.Hour}}
	return limits
}

// TestHistoryRPCNoHistoryClass: a position behind the top of a stream
// whose class keeps no history (size 0) is answered no_history, not
// trimmed: nothing was ever kept, and a client told "trimmed" would look
// for a bigger history that would have kept it. At the top nothing was
// missed: no reason. A class that keeps history still says trimmed.
func TestHistoryRPCNoHistoryClass(t *testing.T) {
	ctx := context.Background()
	store := memory.NewHistory(pipeline.HistoryCaps{})
	cfg := config.Default().Logic
	cfg.Auth = config.Auth{Mode: config.AuthInsecureJSON}
	limits := sizeZeroLimits()
	st, err := New(cfg, Options{Registry: memory.New(time.Minute, time.Minute), PushTopics: []string{"push"}, History: store,
		HistoryLimits: limits, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	// The store keeps what [history] says, as the pusher appends.
	limit := func(s string) pipeline.StreamLimit {
		l := limits.Limit(s)
		return pipeline.StreamLimit{Size: l.Size, TTL: l.TTL}
	}
	// live://1 keeps 100: 105 appends trim the first 5.
	epochs := map[string]string{}
	for stream, n := range map[string]int{"user:7": 3, "room:chat://1": 3, "room:live://1": 105} {
		for i := range n {
			ps, err := store.Append(ctx, []string{stream}, pipeline.HistoryEntry{ID: fmt.Sprint(stream, i), Op: 1000, Body: []byte("x"), At: time.Now()}, limit)
			if err != nil {
				t.Fatal(err)
			}
			epochs[stream] = ps[0].Epoch
		}
	}
	for _, c := range []struct {
		stream  string
		after   uint64
		want    string
		entries int
	}{
		{"user:7", 1, wire.ReasonNoHistory, 0},
		{"room:chat://1", 2, wire.ReasonNoHistory, 0},
		{"room:chat://1", 3, "", 0}, // at the top: nothing missed
		{"room:chat://1", 4, wire.ReasonFuture, 0},
		{"room:live://1", 2, wire.ReasonTrimmed, 0},
		{"room:live://1", 103, "", 2},
	} {
		r, err := st.grpc.History(ctx, &pb.HistoryReq{Stream: c.stream, Epoch: epochs[c.stream], After: c.after})
		if err != nil || r.Unrecoverable != c.want || len(r.Entries) != c.entries {
			t.Fatalf("%s after %d: reply %v err %v, want unrecoverable %q and %d entries", c.stream, c.after, r, err, c.want, c.entries)
		}
		if r.Top.GetEpoch() != epochs[c.stream] {
			t.Fatalf("%s: top %v, want epoch %s", c.stream, r.Top, epochs[c.stream])
		}
	}
	// A foreign epoch is still "epoch", size 0 or not.
	if r, err := st.grpc.History(ctx, &pb.HistoryReq{Stream: "user:7", Epoch: "other", After: 1}); err != nil || r.Unrecoverable != wire.ReasonEpoch {
		t.Fatalf("foreign epoch: %v %v, want epoch", r, err)
	}
}

// TestHistoryRouteNoHistoryClass: GET /im/history gives the same reason.
func TestHistoryRouteNoHistoryClass(t *testing.T) {
	h := newFakeHistory()
	a := newAPI(t, apiOptions{history: h, historyLimits: sizeZeroLimits()})
	for i := 1; i <= 3; i++ {
		if r := a.do("POST", "/im/push/room?operation=1001&type=chat&room=1", "", fmt.Sprint(i), nil); r.status != 200 {
			t.Fatalf("push %d: %d", i, r.status)
		}
	}
	for _, c := range []struct {
		after uint64
		want  string
	}{{1, wire.ReasonNoHistory}, {3, ""}} {
		r := a.do("GET", fmt.Sprintf("/im/history?stream=room:chat://1&epoch=%s&after=%d", epochOf("room:chat://1"), c.after), "", "", nil)
		var d historyData
		if err := json.Unmarshal(r.Data, &d); r.status != 200 || err != nil {
			t.Fatalf("after %d: status %d data %s (%v)", c.after, r.status, r.Data, err)
		}
		if d.Unrecoverable != c.want || len(d.Entries) != 0 || d.Top.Pos != 3 {
			t.Fatalf("after %d: %+v, want unrecoverable %q, no entries, top 3", c.after, d, c.want)
		}
	}
}

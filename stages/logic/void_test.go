package logic

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/proto/pb"
)

func (a *apiServer) failPublish(err error) {
	a.pub.mu.Lock()
	defer a.pub.mu.Unlock()
	a.pub.fail = err
}

// since reads everything h keeps of stream.
func since(t *testing.T, h pipeline.History, stream string) ([]pipeline.HistoryEntry, pipeline.StreamPos) {
	t.Helper()
	es, top, err := h.Since(context.Background(), stream, "", 0, 0)
	if err != nil {
		t.Fatalf("Since(%s): %v", stream, err)
	}
	return es, top
}

// TestPublishFailureVoidsPositions: on main a push answered 503 (the
// broker refused it: "nothing was accepted") kept its positions and its
// message in history, so a node seeing the gap, a recovery and GET
// /im/history still gave it, and the backend's retry made a duplicate
// under a new position. Now its positions are voided: taken, no message.
func TestPublishFailureVoidsPositions(t *testing.T) {
	for _, tt := range []struct {
		name, path string
		streams    []string
	}{
		{"room", "/im/push/room?operation=1000&type=live&room=1", []string{"room:live://1"}},
		{"mids", "/im/push/mids?operation=1000&mids=1&mids=2&mids=7", []string{"user:1", "user:2", "user:7"}},
		{"keys", "/im/push/keys?operation=1000&keys=k1&keys=k2", []string{"user:1", "user:2"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := memory.NewHistory(pipeline.HistoryCaps{})
			a := newAPI(t, apiOptions{history: h})
			a.online(1, "k1")
			a.online(2, "k2")
			a.failPublish(errors.New("broker full: nack"))
			if r := a.do("POST", tt.path, "", "refused", nil); r.status != 503 {
				t.Fatalf("push with the broker refusing: %d, want 503", r.status)
			}
			for _, s := range tt.streams {
				es, top := since(t, h, s)
				if top.Pos != 1 || len(es) != 1 || !es[0].Void || len(es[0].Body) != 0 {
					t.Fatalf("%s after a 503: top %d, entries %+v; want position 1 void", s, top.Pos, es)
				}
			}
			// The retry is accepted at the next position, the only
			// message of the stream.
			a.failPublish(nil)
			if r := a.do("POST", tt.path, "", "accepted", nil); r.status != 200 {
				t.Fatalf("retry: %d", r.status)
			}
			for _, s := range tt.streams {
				es, _ := since(t, h, s)
				if len(es) != 2 || !es[0].Void || es[1].Void || es[1].Pos != 2 || string(es[1].Body) != "accepted" {
					t.Fatalf("%s after the retry: %+v; want 1 void, 2 accepted", s, es)
				}
				var d historyData
				if r := a.do("GET", "/im/history?stream="+s, "", "", nil); r.status != 200 || json.Unmarshal(r.Data, &d) != nil {
					t.Fatalf("GET /im/history %s: %d %s", s, r.status, r.Data)
				}
				if len(d.Entries) != 1 || d.Entries[0].Pos != 2 || deref(d.Entries[0].Msg) != "accepted" {
					t.Fatalf("GET /im/history %s gives %s; want only position 2", s, r2s(d))
				}
			}
		})
	}
}

func r2s(d historyData) string {
	b, _ := json.Marshal(d)
	return string(b)
}

// failingAppends fails every Append after the first ok ones, recording
// the streams each Append that succeeded was given.
type failingAppends struct {
	pipeline.History
	mu  sync.Mutex
	ok  int
	got [][]string
}

func (f *failingAppends) Append(ctx context.Context, streams []string, e pipeline.HistoryEntry, limit func(string) pipeline.StreamLimit) ([]pipeline.StreamPos, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.got) >= f.ok {
		return nil, errors.New("redis: connection reset")
	}
	f.got = append(f.got, slices.Clone(streams))
	return f.History.Append(ctx, streams, e, limit)
}

// TestChunkedPushFailureVoidsEarlierChunks: a push to more users than one
// Append takes appended its first chunk, then a later chunk failed and
// the push was answered 503; on main the first chunk's users kept the
// message. Now those positions are voided and nothing is published.
func TestChunkedPushFailureVoidsEarlierChunks(t *testing.T) {
	mem := memory.NewHistory(pipeline.HistoryCaps{})
	h := &failingAppends{History: mem, ok: 1}
	a := newAPI(t, apiOptions{history: h})
	const users = maxAppendStreams + 50
	var q strings.Builder
	q.WriteString("/im/push/mids?operation=1000")
	for m := 1; m <= users; m++ {
		fmt.Fprintf(&q, "&mids=%d", m)
	}
	if r := a.do("POST", q.String(), "", "half", nil); r.status != 503 {
		t.Fatalf("push with the second chunk failing: %d, want 503", r.status)
	}
	if n := a.pub.count(); n != 0 {
		t.Fatalf("%d messages published, want 0", n)
	}
	if len(h.got) != 1 || len(h.got[0]) != maxAppendStreams {
		t.Fatalf("appended chunks %d, want one of %d", len(h.got), maxAppendStreams)
	}
	first := map[string]bool{}
	for _, s := range h.got[0] {
		first[s] = true
		es, top := since(t, mem, s)
		if top.Pos != 1 || len(es) != 1 || !es[0].Void {
			t.Fatalf("%s of the first chunk: top %d, entries %+v; want position 1 void", s, top.Pos, es)
		}
	}
	for m := 1; m <= users; m++ {
		s := pipeline.UserStream(int64(m))
		if first[s] {
			continue
		}
		if _, top := since(t, mem, s); top.Pos != 0 {
			t.Fatalf("%s of the failed chunk at %d, want nothing appended", s, top.Pos)
		}
	}
}

// TestKeyPushKeepsItsKeys: on main a key push's history entry did not say
// which keys it was for, so a node filling a gap or recovering gave it to
// every connection of the user. Now the entry keeps the keys and the
// History RPC passes them on; a mid push's entry has none.
func TestKeyPushKeepsItsKeys(t *testing.T) {
	h := memory.NewHistory(pipeline.HistoryCaps{})
	a := newAPI(t, apiOptions{history: h})
	a.online(1, "k1")
	a.online(1, "k1b")
	a.online(1, "k1c")
	a.online(2, "k2")
	if r := a.do("POST", "/im/push/keys?operation=1000&keys=k1b&keys=k1&keys=gone", "", "to two keys", nil); r.status != 200 {
		t.Fatalf("key push: %d", r.status)
	}
	if r := a.do("POST", "/im/push/mids?operation=1000&mids=1", "", "to the user", nil); r.status != 200 {
		t.Fatalf("mid push: %d", r.status)
	}
	es, _ := since(t, h, "user:1")
	if len(es) != 2 || !slices.Equal(es[0].Keys, []string{"k1", "k1b"}) || len(es[1].Keys) != 0 {
		t.Fatalf("user:1 entries %+v; want keys [k1 k1b] then none", es)
	}
	if _, top := since(t, h, "user:2"); top.Pos != 0 {
		t.Fatalf("user:2 took a position of a push to another user's keys: %+v", top)
	}
	s := historyServer(t, h, slog.New(slog.DiscardHandler))
	r, err := s.History(context.Background(), &pb.HistoryReq{Stream: "user:1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Entries) != 2 || !slices.Equal(r.Entries[0].Keys, []string{"k1", "k1b"}) || len(r.Entries[1].Keys) != 0 {
		t.Fatalf("History RPC entries %v; want keys [k1 k1b] then none", r.Entries)
	}
}

// TestHistoryRPCPassesVoid: the History RPC gives a void entry marked,
// with no body, so a node passes over its position instead of waiting for
// it again.
func TestHistoryRPCPassesVoid(t *testing.T) {
	h := memory.NewHistory(pipeline.HistoryCaps{})
	a := newAPI(t, apiOptions{history: h})
	const path = "/im/push/room?operation=1000&type=live&room=1"
	a.failPublish(errors.New("broker full"))
	if r := a.do("POST", path, "", "refused", nil); r.status != 503 {
		t.Fatalf("push: %d, want 503", r.status)
	}
	a.failPublish(nil)
	if r := a.do("POST", path, "", "accepted", nil); r.status != 200 {
		t.Fatalf("push: %d", r.status)
	}
	s := historyServer(t, h, slog.New(slog.DiscardHandler))
	r, err := s.History(context.Background(), &pb.HistoryReq{Stream: "room:live://1"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Entries) != 2 || !r.Entries[0].Void || len(r.Entries[0].Body) != 0 || r.Entries[0].Pos != 1 ||
		r.Entries[1].Void || string(r.Entries[1].Body) != "accepted" {
		t.Fatalf("History RPC entries %v; want 1 void without body, 2 accepted", r.Entries)
	}
}

// TestHistoryRouteSkipsVoid: GET /im/history leaves void positions out
// and says in last how far it read, so a page of only void positions
// does not make the caller ask the same page again.
func TestHistoryRouteSkipsVoid(t *testing.T) {
	h := memory.NewHistory(pipeline.HistoryCaps{})
	a := newAPI(t, apiOptions{history: h})
	const path = "/im/push/room?operation=1000&type=live&room=1"
	for i := 1; i <= 5; i++ {
		a.failPublish(nil)
		if i == 2 || i == 3 {
			a.failPublish(errors.New("broker full"))
		}
		a.do("POST", path, "", fmt.Sprintf("m%d", i), nil)
	}
	es, top := since(t, h, "room:live://1")
	if top.Pos != 5 || len(es) != 5 {
		t.Fatalf("top %+v, %d entries", top, len(es))
	}
	epoch := "&epoch=" + top.Epoch
	for _, tt := range []struct {
		name, query string
		pos         []uint64
		last        uint64
		more        bool
	}{
		{"everything", "", []uint64{1, 4, 5}, 5, false},
		{"a page ending in voids", "&after=0&limit=3" + epoch, []uint64{1}, 3, true},
		{"a page of voids only", "&after=1&limit=2" + epoch, nil, 3, true},
		{"the rest", "&after=3" + epoch, []uint64{4, 5}, 5, false},
		{"at the top", "&after=5" + epoch, nil, 5, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := a.do("GET", "/im/history?stream=room:live://1"+tt.query, "", "", nil)
			var d struct {
				historyData
				Last uint64 `json:"last"`
			}
			if r.status != 200 || json.Unmarshal(r.Data, &d) != nil {
				t.Fatalf("status %d %s", r.status, r.Data)
			}
			var got []uint64
			for _, e := range d.Entries {
				got = append(got, e.Pos)
			}
			if !slices.Equal(got, tt.pos) || d.Last != tt.last || d.More != tt.more {
				t.Fatalf("entries %v last %d more %v; want %v %d %v", got, d.Last, d.More, tt.pos, tt.last, tt.more)
			}
		})
	}
}

// voidFailing fails every Void, counting them.
type voidFailing struct {
	pipeline.History
	mu    sync.Mutex
	voids int
	ctxOK bool // the last Void's context was live, with a deadline
}

func (v *voidFailing) Void(ctx context.Context, _ []pipeline.StreamPos) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.voids++
	dl, ok := ctx.Deadline()
	v.ctxOK = ctx.Err() == nil && ok && time.Until(dl) <= voidTimeout
	return errors.New("redis: connection refused")
}

// TestVoidRunsPastTheRequestAndFailsQuietly: the Void after a failed
// publish runs on a live context bounded by voidTimeout even when the
// request's context ended (the usual reason a publish fails), and its own
// failure leaves the answer a 503.
func TestVoidRunsPastTheRequestAndFailsQuietly(t *testing.T) {
	h := &voidFailing{History: memory.NewHistory(pipeline.HistoryCaps{})}
	pub := &ctxPublisher{calls: make(chan struct{}, 1)}
	a := newAPI(t, apiOptions{history: h, pub: pub, writeTimeout: 500 * time.Millisecond})
	if r := a.do("POST", "/im/push/room?operation=1000&type=live&room=1", "", "x", nil); r.status != 503 {
		t.Fatalf("push with the publish timing out: %d, want 503", r.status)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.voids != 1 || !h.ctxOK {
		t.Fatalf("%d Voids, context live with a deadline within %v: %v; want 1, true", h.voids, voidTimeout, h.ctxOK)
	}
}

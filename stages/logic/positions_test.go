package logic

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// fakeHistory is a pipeline.History in memory: one epoch per stream
// ("e-" and the stream, see epochOf), positions from 1, the last limit(stream).Size entries
// kept. It records each Append's streams, and fails while fail is set.
type fakeHistory struct {
	mu      sync.Mutex
	top     map[string]uint64
	kept    map[string][]pipeline.HistoryEntry
	appends [][]string
	fail    error
}

func newFakeHistory() *fakeHistory {
	return &fakeHistory{top: map[string]uint64{}, kept: map[string][]pipeline.HistoryEntry{}}
}

// epochOf is a stream's epoch in the fake: "e-" and the stream, with the
// characters an epoch may not hold as '_'.
func epochOf(stream string) string {
	return "e-" + strings.NewReplacer(":", "_", "/", "_").Replace(stream)
}

func (h *fakeHistory) Append(_ context.Context, streams []string, e pipeline.HistoryEntry, limit func(string) pipeline.StreamLimit) ([]pipeline.StreamPos, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fail != nil {
		return nil, h.fail
	}
	h.appends = append(h.appends, slices.Clone(streams))
	out := make([]pipeline.StreamPos, len(streams))
	for i, s := range streams {
		h.top[s]++
		e.Pos = h.top[s]
		kept := append(h.kept[s], e)
		if n := limit(s).Size; len(kept) > n {
			kept = kept[len(kept)-n:]
		}
		h.kept[s] = kept
		out[i] = pipeline.StreamPos{Stream: s, Epoch: epochOf(s), Pos: e.Pos}
	}
	return out, nil
}

func (h *fakeHistory) Since(_ context.Context, stream, epoch string, after uint64, max int) ([]pipeline.HistoryEntry, pipeline.StreamPos, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fail != nil {
		return nil, pipeline.StreamPos{}, h.fail
	}
	top := pipeline.StreamPos{Stream: stream, Epoch: epochOf(stream), Pos: h.top[stream]}
	switch {
	case after > 0 && epoch != top.Epoch:
		return nil, top, pipeline.ErrEpochChanged
	case after > top.Pos:
		return nil, top, pipeline.ErrFuturePosition
	}
	kept := h.kept[stream]
	if after < top.Pos && (len(kept) == 0 || kept[0].Pos > after+1) && after > 0 {
		return nil, top, pipeline.ErrTrimmed
	}
	var out []pipeline.HistoryEntry
	for _, e := range kept {
		if e.Pos > after && len(out) < max {
			out = append(out, e)
		}
	}
	return out, top, nil
}

func (h *fakeHistory) Tops(_ context.Context, streams []string) ([]pipeline.StreamPos, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]pipeline.StreamPos, len(streams))
	for i, s := range streams {
		out[i] = pipeline.StreamPos{Stream: s, Epoch: epochOf(s), Pos: h.top[s]}
	}
	return out, nil
}

func (h *fakeHistory) Ack(context.Context, string, string, uint64) error { return nil }

func (h *fakeHistory) Acked(_ context.Context, stream string) (pipeline.StreamPos, error) {
	return pipeline.StreamPos{Stream: stream}, nil
}

func (h *fakeHistory) Void(context.Context, []pipeline.StreamPos) error { return nil }

func (h *fakeHistory) setFail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fail = err
}

func (h *fakeHistory) appendCalls() [][]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.appends)
}

// pushData is the data of a push reply.
type pushData struct {
	MsgID     string     `json:"msg_id"`
	Positions []Position `json:"positions"`
}

func (r apiReply) push(t *testing.T) pushData {
	t.Helper()
	var d pushData
	if err := json.Unmarshal(r.Data, &d); err != nil {
		t.Fatalf("push reply data %s: %v", r.Data, err)
	}
	return d
}

func posText(ps []Position) string {
	var s []string
	for _, p := range ps {
		s = append(s, fmt.Sprintf("%s@%s/%d", p.Stream, p.Epoch, p.Pos))
	}
	return strings.Join(s, " ")
}

func pbPosText(ps []*pb.StreamPos) string {
	var s []string
	for _, p := range ps {
		s = append(s, fmt.Sprintf("%s@%s/%d", p.Stream, p.Epoch, p.Pos))
	}
	return strings.Join(s, " ")
}

// TestPushesTakeTheirPositions: each push takes the next position in each
// stream it goes to before it is published; the reply and the published
// PushMsg carry them. A broadcast takes none; guests (mid 0) have no
// stream; an offline user's stream still gets the message.
func TestPushesTakeTheirPositions(t *testing.T) {
	tests := []struct {
		name      string
		path      string
		reply     string   // positions in the reply
		published []string // positions of each PushMsg, by server
		appends   int      // History.Append calls
	}{
		{"room", "/im/push/room?operation=1000&type=live&room=1", "room:live://1@e-room_live___1/1", []string{"room:live://1@e-room_live___1/1"}, 1},
		{"mids online and offline", "/im/push/mids?operation=1000&mids=2&mids=1&mids=3&mids=1", "user:1@e-user_1/1 user:2@e-user_2/1 user:3@e-user_3/1",
			[]string{"user:1@e-user_1/1 user:2@e-user_2/1"}, 1},
		{"mid offline only", "/im/push/mids?operation=1000&mids=3", "user:3@e-user_3/1", nil, 1},
		{"keys", "/im/push/keys?operation=1000&keys=k2&keys=k1&keys=gone", "user:1@e-user_1/1 user:2@e-user_2/1", []string{"user:1@e-user_1/1 user:2@e-user_2/1"}, 1},
		{"keys of one user", "/im/push/keys?operation=1000&keys=k1&keys=k1b", "user:1@e-user_1/1", []string{"user:1@e-user_1/1"}, 1},
		{"key on the other node", "/im/push/keys?operation=1000&keys=k9", "user:9@e-user_9/1", []string{"user:9@e-user_9/1"}, 1},
		{"offline keys only", "/im/push/keys?operation=1000&keys=gone", "", nil, 0},
		{"guest key", "/im/push/keys?operation=1000&keys=guest", "", []string{""}, 0},
		{"goim guests", "/goim/push/mids?operation=1000&mids=0", "", []string{""}, 0},
		{"broadcast", "/im/push/all?operation=1000", "", []string{""}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newFakeHistory()
			a := newAPI(t, apiOptions{history: h})
			a.online(1, "k1")
			a.online(1, "k1b")
			a.online(2, "k2")
			a.online(0, "guest")
			if _, err := a.registry.RenewNode(context.Background(), &pb.NodeInfo{Id: "n2"}); err != nil {
				t.Fatal(err)
			}
			if _, _, err := a.registry.AddSession(context.Background(), 9, "k9", "n2", 0); err != nil {
				t.Fatal(err)
			}
			r := a.do("POST", tt.path, "", "hi", nil)
			if r.status != 200 {
				t.Fatalf("status %d %v", r.status, deref(r.Msg))
			}
			if got := posText(r.push(t).Positions); got != tt.reply {
				t.Fatalf("reply positions %q, want %q", got, tt.reply)
			}
			var got []string
			for _, pm := range a.published() {
				got = append(got, pbPosText(pm.Positions))
			}
			if !slices.Equal(got, tt.published) {
				t.Fatalf("published PushMsg positions %q, want %q", got, tt.published)
			}
			if n := len(h.appendCalls()); n != tt.appends {
				t.Fatalf("%d Append calls, want %d (one per push)", n, tt.appends)
			}
		})
	}
}

// TestKeyPushSplitsPositionsByNode: each node's PushMsg carries the
// positions of its own keys' users only.
func TestKeyPushSplitsPositionsByNode(t *testing.T) {
	h := newFakeHistory()
	a := newAPI(t, apiOptions{history: h})
	if _, err := a.registry.RenewNode(context.Background(), &pb.NodeInfo{Id: "n2"}); err != nil {
		t.Fatal(err)
	}
	a.online(1, "a1")
	for _, s := range []struct {
		mid       int64
		key, node string
	}{{2, "b1", "n2"}, {1, "a2", "n2"}} {
		if _, _, err := a.registry.AddSession(context.Background(), s.mid, s.key, s.node, 0); err != nil {
			t.Fatal(err)
		}
	}
	if r := a.do("POST", "/im/push/mids?operation=1000&mids=1&mids=2", "", "hi", nil); r.status != 200 {
		t.Fatalf("status %d", r.status)
	}
	got := map[string]string{}
	for _, pm := range a.published() {
		got[pm.Server] = pbPosText(pm.Positions)
	}
	want := map[string]string{"n1": "user:1@e-user_1/1", "n2": "user:1@e-user_1/1 user:2@e-user_2/1"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("positions by node %v, want %v", got, want)
	}
}

// TestPushToManyUsersAppendsInBoundedCalls: a push to more users than
// one Append takes is split, each stream in one call only.
func TestPushToManyUsersAppendsInBoundedCalls(t *testing.T) {
	h := newFakeHistory()
	a := newAPI(t, apiOptions{history: h})
	const users = 2*maxAppendStreams + 50
	var q strings.Builder
	q.WriteString("/im/push/mids?operation=1000")
	for m := 1; m <= users; m++ {
		fmt.Fprintf(&q, "&mids=%d", m)
	}
	r := a.do("POST", q.String(), "", "hi", nil)
	if r.status != 200 {
		t.Fatalf("status %d %v", r.status, deref(r.Msg))
	}
	if n := len(r.push(t).Positions); n != users {
		t.Fatalf("%d positions in the reply, want %d", n, users)
	}
	calls := h.appendCalls()
	if len(calls) != 3 {
		t.Fatalf("%d Append calls, want 3", len(calls))
	}
	seen := map[string]bool{}
	for _, c := range calls {
		if len(c) > maxAppendStreams {
			t.Fatalf("an Append of %d streams, more than %d", len(c), maxAppendStreams)
		}
		for _, s := range c {
			if seen[s] {
				t.Fatalf("stream %s appended twice", s)
			}
			seen[s] = true
		}
	}
	if len(seen) != users {
		t.Fatalf("%d streams appended, want %d", len(seen), users)
	}
}

// TestPositionsRiseInAcceptOrder: pushes sent concurrently to a room and
// a user get distinct positions, and a push sent after another's 200 has
// a higher position than it.
func TestPositionsRiseInAcceptOrder(t *testing.T) {
	h := newFakeHistory()
	a := newAPI(t, apiOptions{history: h})
	a.online(1, "k1")
	const workers, each = 8, 25
	for _, path := range []string{"/im/push/room?operation=1000&type=live&room=1", "/im/push/mids?operation=1000&mids=1"} {
		var (
			mu       sync.Mutex
			answered uint64 // the highest position answered so far
			seen     = map[uint64]bool{}
			wg       sync.WaitGroup
		)
		for range workers {
			wg.Go(func() {
				for range each {
					mu.Lock()
					before := answered
					mu.Unlock()
					r := a.do("POST", path, "", "x", nil)
					if r.status != 200 {
						t.Errorf("status %d", r.status)
						return
					}
					ps := r.push(t).Positions
					if len(ps) != 1 {
						t.Errorf("%d positions, want 1", len(ps))
						return
					}
					pos := ps[0].Pos
					mu.Lock()
					if pos <= before {
						t.Errorf("%s: position %d after a 200 for position %d", path, pos, before)
					}
					if seen[pos] {
						t.Errorf("%s: position %d given twice", path, pos)
					}
					seen[pos] = true
					answered = max(answered, pos)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if len(seen) != workers*each || answered != workers*each {
			t.Fatalf("%s: %d distinct positions up to %d, want 1..%d", path, len(seen), answered, workers*each)
		}
	}
	// Every push was published, carrying its position.
	last := map[string]uint64{}
	count := map[string]int{}
	for _, pm := range a.published() {
		for _, sp := range pm.Positions {
			count[sp.Stream]++
			last[sp.Stream] = max(last[sp.Stream], sp.Pos)
		}
	}
	for s, n := range count {
		if n != workers*each || last[s] != workers*each {
			t.Fatalf("stream %s: %d messages published up to position %d, want %d", s, n, last[s], workers*each)
		}
	}
}

// TestHistoryDownIs503AndPublishesNothing: a push that cannot take its
// positions is not published; the caller is told to retry, and an
// Idempotency-Key is released for that retry.
func TestHistoryDownIs503AndPublishesNothing(t *testing.T) {
	h := newFakeHistory()
	a := newAPI(t, apiOptions{history: h})
	a.online(1, "k1")
	h.setFail(errors.New("dial tcp 127.0.0.1:6379: connection refused"))
	for _, path := range []string{
		"/im/push/room?operation=1000&type=live&room=1",
		"/im/push/mids?operation=1000&mids=1",
		"/im/push/mids?operation=1000&mids=5",
		"/im/push/keys?operation=1000&keys=k1",
		"/goim/push/room?operation=1000&type=live&room=1",
	} {
		r := a.do("POST", path, "", "x", http.Header{"Idempotency-Key": {"k-" + path}})
		if r.status != 503 || r.Code != -503 || r.header.Get("Retry-After") == "" || !strings.Contains(deref(r.Msg), "history") {
			t.Fatalf("%s: status %d code %d Retry-After %q message %q; want 503 naming history, with Retry-After", path, r.status, r.Code, r.header.Get("Retry-After"), deref(r.Msg))
		}
	}
	if n := len(a.published()); n != 0 {
		t.Fatalf("%d messages published while history was down, want 0", n)
	}
	// A broadcast needs no position: it goes out.
	if r := a.do("POST", "/im/push/all?operation=1000", "", "x", nil); r.status != 200 {
		t.Fatalf("broadcast while history is down: %d, want 200", r.status)
	}
	h.setFail(nil)
	path := "/im/push/room?operation=1000&type=live&room=1"
	r := a.do("POST", path, "", "x", http.Header{"Idempotency-Key": {"k-" + path}})
	if r.status != 200 || r.header.Get("Idempotent-Replayed") != "" || posText(r.push(t).Positions) != "room:live://1@e-room_live___1/1" {
		t.Fatalf("retry once history is back: status %d replayed %q positions %v; want a fresh 200 at position 1", r.status, r.header.Get("Idempotent-Replayed"), r.push(t).Positions)
	}
}

// TestWithoutHistoryPushesGoOutAsBefore: with no history store pushes
// are published without positions, and the reply has none.
func TestWithoutHistoryPushesGoOutAsBefore(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(1, "k1")
	for _, path := range []string{"/im/push/room?operation=1000&type=live&room=1", "/im/push/mids?operation=1000&mids=1", "/im/push/keys?operation=1000&keys=k1"} {
		r := a.do("POST", path, "", "x", nil)
		if r.status != 200 || strings.Contains(string(r.Data), "positions") {
			t.Fatalf("%s: status %d data %s; want 200 without positions", path, r.status, r.Data)
		}
	}
	for _, pm := range a.published() {
		if len(pm.Positions) != 0 {
			t.Fatalf("published %v with positions and no history", pm)
		}
	}
}

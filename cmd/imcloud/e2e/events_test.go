package e2e

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"imcloud/pipeline/events"
	"imcloud/stages/logic/token"
)

// eventLog subscribes to the events topic of h's embedded broker.
type eventLog struct {
	mu  sync.Mutex
	evs []events.Event
}

func subscribeEvents(t *testing.T, h *harness) *eventLog {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	msgs, err := h.node.Broker().Subscriber.Subscribe(ctx, h.cfg.Topics.Events)
	if err != nil {
		t.Fatal(err)
	}
	l := &eventLog{}
	go func() {
		for m := range msgs {
			ev, err := events.Decode(m.Payload)
			m.Ack()
			if err != nil {
				t.Errorf("event: %v", err)
				continue
			}
			l.mu.Lock()
			l.evs = append(l.evs, ev)
			l.mu.Unlock()
		}
	}()
	return l
}

func (l *eventLog) snapshot() []events.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.evs)
}

// waitLen waits until n events arrived and returns them.
func (l *eventLog) waitLen(t *testing.T, n int) []events.Event {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		evs := l.snapshot()
		if len(evs) >= n {
			return evs
		}
		if time.Now().After(deadline) {
			t.Fatalf("got %d events %+v, want %d", len(evs), evs, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestEventsOfAScriptedSession is issue 12's Events bullet: a scripted
// session produces exactly its events, in order. A client connects, a push
// to its user is delivered, a push to a user with nobody online is offline,
// the client (when it opted in, with acks on) acknowledges the delivered
// message, and leaves: exactly connect, delivered, offline, acked and
// disconnect. A plain goim client makes the same session without the
// acked event.
func TestEventsOfAScriptedSession(t *testing.T) {
	for _, tc := range []struct {
		name string
		// opted: the client opts in to recovery (claim recover) with
		// history.user.acks on, reads op 20 and acknowledges.
		opted bool
	}{
		{name: "plain client"},
		{name: "opted in with acks", opted: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sets := []string{"events.enabled=true"}
			if tc.opted {
				sets = append(sets, "history.user.acks=true")
			}
			h := start(t, sets...)
			log := subscribeEvents(t, h)

			claims := token.Claims{Mid: 7, Key: "k7", Rooms: []string{"live://1000"}, Recover: tc.opted}
			c := h.connect("ws", claims)
			if tc.opted {
				// The node holds positioned messages until op 21.
				if _, err := c.Recover(nil); err != nil {
					t.Fatalf("recover: %v", err)
				}
			}
			log.waitLen(t, 1)
			rep := h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"7"}}, body: "hello"})
			deliveredID := msgID(t, rep)
			var epoch string
			if tc.opted {
				m := readStreamMsg(t, c)
				if m.Stream != "user:7" || m.Pos != 1 || m.Op != 1000 || string(m.Body) != "hello" || m.Epoch == "" {
					t.Fatalf("user push: %s@%d op %d %q, want user:7@1 op 1000 hello", m.Stream, m.Pos, m.Op, m.Body)
				}
				epoch = m.Epoch
			} else {
				expect(t, "user push", c, 1000, "hello")
			}
			log.waitLen(t, 2)
			rep = h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1001"}, "mids": {"8"}}, body: "to nobody"})
			offlineID := msgID(t, rep)
			log.waitLen(t, 3)

			node := log.snapshot()[0].Node
			if node == "" {
				t.Fatal("connect event names no node")
			}
			userPos := &events.Position{Stream: "user:7", Epoch: epoch, Pos: 1}
			want := []events.Event{
				{Kind: events.Connect, Node: node, Mid: 7, Key: "k7", Rooms: []string{"live://1000"}},
				{Kind: events.Delivered, Node: node, Mid: 7, Key: "k7", MsgID: deliveredID, Op: 1000, Position: userPos},
				{Kind: events.Offline, Mid: 8, MsgID: offlineID, Op: 1001},
			}
			if tc.opted {
				if ok, err := c.AckUser(7); !ok || err != nil {
					t.Fatalf("ack: %v %v", ok, err)
				}
				log.waitLen(t, len(want)+1)
				want = append(want, events.Event{Kind: events.Acked, Node: node, Mid: 7, Key: "k7", Position: userPos})
			}
			_ = c.Close()
			want = append(want, events.Event{Kind: events.Disconnect, Node: node, Mid: 7, Key: "k7", Rooms: []string{"live://1000"}, Code: 1000})
			log.waitLen(t, len(want))

			// A sentinel: the events are published in emission order,
			// so the sentinel's offline event arriving right after the
			// session's shows nothing else came (no second acked, no
			// delivered of the ack, no stray event of any kind).
			h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"99"}}, body: "sentinel"})
			evs := log.waitLen(t, len(want)+1)
			if s := evs[len(want)]; s.Kind != events.Offline || s.Mid != 99 {
				t.Fatalf("event %d %+v, want the sentinel's offline of mid 99; all: %+v", len(want)+1, s, evs)
			}
			if len(evs) != len(want)+1 {
				t.Fatalf("got %d events, want exactly %d: %+v", len(evs), len(want)+1, evs)
			}
			for i, ev := range evs[:len(want)] {
				if ev.At.IsZero() {
					t.Errorf("event %d has no time", i)
				}
				w := want[i]
				if ev.Kind != w.Kind || ev.Node != w.Node || ev.Mid != w.Mid || ev.Key != w.Key || !slices.Equal(ev.Rooms, w.Rooms) ||
					ev.Code != w.Code || ev.Reason != w.Reason || ev.MsgID != w.MsgID || ev.Op != w.Op {
					t.Errorf("event %d = %+v, want %+v", i, ev, w)
				}
				// The user push is the first message of user 7's
				// stream: delivered and acked carry its position
				// (the epoch the client saw, when it saw one); no
				// other event carries a position.
				switch {
				case w.Position == nil && ev.Position != nil:
					t.Errorf("event %d (%s) carries a position %+v", i, ev.Kind, ev.Position)
				case w.Position != nil && (ev.Position == nil || ev.Position.Stream != w.Position.Stream || ev.Position.Pos != w.Position.Pos ||
					ev.Position.Epoch == "" || (w.Position.Epoch != "" && ev.Position.Epoch != w.Position.Epoch)):
					t.Errorf("event %d (%s) position %+v, want %+v with an epoch", i, ev.Kind, ev.Position, *w.Position)
				}
			}
		})
	}
}

// TestEventsKindsSwitch: kinds left out of events.kinds are not published.
func TestEventsKindsSwitch(t *testing.T) {
	h := start(t, "events.enabled=true", "events.kinds=offline")
	log := subscribeEvents(t, h)
	c := h.connect("tcp", token.Claims{Mid: 3, Key: "k3"})
	h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"3", "4"}}, body: "x"})
	expect(t, "user push", c, 1000, "x")
	_ = c.Close()
	evs := log.waitLen(t, 1)
	if evs[0].Kind != events.Offline || evs[0].Mid != 4 {
		t.Fatalf("first event %+v, want offline of mid 4", evs[0])
	}
	// A key push to the connection still open on another client makes a
	// delivered event only if the kind were on: it is not.
	c2 := h.connect("tcp", token.Claims{Mid: 5, Key: "k5"})
	h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": {"k5"}}, body: "y"})
	expect(t, "key push", c2, 1000, "y")
	h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {"6"}}, body: "z"})
	evs = log.waitLen(t, 2)
	if len(evs) != 2 || evs[1].Kind != events.Offline || evs[1].Mid != 6 {
		t.Fatalf("events %+v, want only the two offline ones", evs)
	}
}

func msgID(t *testing.T, rep apiReply) string {
	t.Helper()
	var d struct {
		MsgID string `json:"msg_id"`
	}
	if err := json.Unmarshal(rep.Data, &d); err != nil || d.MsgID == "" {
		t.Fatalf("reply %s has no msg_id (%v)", rep.Data, err)
	}
	return d.MsgID
}

// TestPresenceAndOnlineAcrossNodes: the routes answer from both cloud
// nodes' rooms and the registry's sessions.
func TestPresenceAndOnlineAcrossNodes(t *testing.T) {
	h := start(t)
	other := start(t, "stages=cloud", "cloud.logic_addr="+h.addrs.LogicGRPC)
	h.connect("ws", token.Claims{Mid: 11, Key: "a", Rooms: []string{"live://77"}})
	other.connect("tcp", token.Claims{Mid: 12, Key: "b", Rooms: []string{"live://77"}})
	h.connect("tcp", token.Claims{Mid: 13, Key: "c", Rooms: []string{"live://78"}})

	var room struct {
		Room    string `json:"room"`
		Members []struct {
			Mid int64  `json:"mid"`
			Key string `json:"key"`
		} `json:"members"`
		Truncated bool `json:"truncated"`
		Nodes     int  `json:"nodes"`
	}
	if status := h.get("/im/presence/room?type=live&room=77", &room); status != http.StatusOK {
		t.Fatalf("presence: status %d", status)
	}
	if room.Room != "live://77" || room.Truncated || room.Nodes != 2 || len(room.Members) != 2 ||
		room.Members[0].Mid != 11 || room.Members[0].Key != "a" || room.Members[1].Mid != 12 || room.Members[1].Key != "b" {
		t.Fatalf("presence of live://77 = %+v, want a (11) and b (12) from 2 nodes", room)
	}

	var online struct {
		Online  []int64 `json:"online"`
		Offline []int64 `json:"offline"`
	}
	if status := h.get("/im/online/mids?mids=11,12,13,14", &online); status != http.StatusOK {
		t.Fatalf("online: status %d", status)
	}
	if !slices.Equal(online.Online, []int64{11, 12, 13}) || !slices.Equal(online.Offline, []int64{14}) {
		t.Fatalf("online = %+v, want 11, 12 and 13 online, 14 offline", online)
	}
	if status := h.get("/im/online/mids?mids=abc", nil); status != http.StatusBadRequest {
		t.Fatalf("bad mids: status %d, want 400", status)
	}
}

package logic

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// presenceServer is a logic API whose cloud nodes answer Presence from
// members (node id → room → members), and fail when listed in down.
func presenceServer(t *testing.T, reg pipeline.Registry, members map[string]map[string][]*pb.PresenceMember, down map[string]bool) *apiServer {
	t.Helper()
	cfg := config.Default().Logic
	cfg.Auth.JWTSecret = "s"
	cfg.APIKeys = []string{"0123456789abcdef-key"}
	st, err := New(cfg, Options{Registry: reg, Publisher: &recordingPublisher{}, PushTopics: []string{"push"},
		Replies: memory.NewReplies(time.Minute), Heartbeat: 30 * time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	st.presence = func(ctx context.Context, n *pb.NodeInfo, room string) (*pb.PresenceReply, error) {
		if down[n.Id] {
			<-ctx.Done() // a node that hangs: the fan-out's timeout ends it
			return nil, ctx.Err()
		}
		ms := members[n.Id][room]
		rep := &pb.PresenceReply{Members: ms}
		if len(ms) > MaxPresenceMembers {
			rep.Members, rep.Truncated = ms[:MaxPresenceMembers], true
		}
		return rep, nil
	}
	srv := httptest.NewServer(st.Handler())
	t.Cleanup(srv.Close)
	return &apiServer{t: t, url: srv.URL}
}

var presenceAuth = http.Header{"Authorization": {"Bearer 0123456789abcdef-key"}}

func TestPresenceRoom(t *testing.T) {
	ctx := context.Background()
	reg := memory.New(time.Minute, time.Minute)
	for _, n := range []*pb.NodeInfo{
		{Id: "n1", RoomCount: map[string]int32{"live://1000": 2}},
		{Id: "n2", RoomCount: map[string]int32{"live://1000": 1, "live://big": 1500}},
		{Id: "n3", RoomCount: map[string]int32{"live://other": 1}},
		{Id: "dead", RoomCount: map[string]int32{"live://lost": 1}},
	} {
		if _, err := reg.RenewNode(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	big := make([]*pb.PresenceMember, 1500)
	for i := range big {
		big[i] = &pb.PresenceMember{Mid: int64(i + 1), Key: fmt.Sprintf("b%04d", i)}
	}
	members := map[string]map[string][]*pb.PresenceMember{
		"n1": {"live://1000": {{Mid: 2, Key: "k2"}, {Mid: 1, Key: "k1b"}}},
		"n2": {"live://1000": {{Mid: 1, Key: "k1a"}}, "live://big": big},
		"n3": {"live://other": {{Mid: 9, Key: "k9"}}},
	}
	a := presenceServer(t, reg, members, map[string]bool{"dead": true})

	tests := []struct {
		name        string
		query       string
		header      http.Header
		status      int
		wantMembers []presenceMember
		wantCount   int
		truncated   bool
		nodes       int
		wantErr     string
	}{
		{name: "merged across nodes, sorted", query: "?type=live&room=1000", status: 200, nodes: 2,
			wantMembers: []presenceMember{{1, "k1a"}, {1, "k1b"}, {2, "k2"}}},
		{name: "empty room", query: "?type=live&room=nobody", status: 200, wantMembers: []presenceMember{}},
		{name: "big room is capped", query: "?type=live&room=big", status: 200, nodes: 1, wantCount: MaxPresenceMembers, truncated: true},
		{name: "every node down is 503", query: "?type=live&room=lost", status: 503, wantErr: "cloud nodes unavailable"},
		{name: "no type", query: "?room=1", status: 400, wantErr: "type"},
		{name: "no room", query: "?type=live", status: 400, wantErr: "room"},
		{name: "type with ://", query: "?type=a://b&room=1", status: 400, wantErr: "type"},
		{name: "room too long", query: "?type=live&room=" + strings.Repeat("x", 300), status: 400, wantErr: "room"},
		{name: "control characters", query: "?type=live&room=%00", status: 400, wantErr: "room"},
		{name: "room twice", query: "?type=live&room=1&room=2", status: 400, wantErr: "room"},
		{name: "bad query", query: "?type=live&room=1;x", status: 400, wantErr: "query"},
		{name: "no API key", query: "?type=live&room=1000", header: http.Header{}, status: 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := tt.header
			if h == nil {
				h = presenceAuth
			}
			r := a.do(http.MethodGet, "/im/presence/room"+tt.query, "", "", h)
			if r.status != tt.status {
				t.Fatalf("status %d (%s), want %d", r.status, deref(r.Msg), tt.status)
			}
			if tt.status != 200 {
				if r.Code != -tt.status || !strings.Contains(deref(r.Msg), tt.wantErr) {
					t.Fatalf("reply %d %q, want code %d naming %q", r.Code, deref(r.Msg), -tt.status, tt.wantErr)
				}
				return
			}
			var got presenceReply
			if err := json.Unmarshal(r.Data, &got); err != nil {
				t.Fatal(err)
			}
			if got.Truncated != tt.truncated || got.Nodes != tt.nodes || got.NodesFailed != 0 {
				t.Fatalf("reply %+v, want truncated %v over %d nodes", got, tt.truncated, tt.nodes)
			}
			if tt.wantMembers != nil && !slices.Equal(got.Members, tt.wantMembers) {
				t.Fatalf("members %+v, want %+v", got.Members, tt.wantMembers)
			}
			if tt.wantCount > 0 && len(got.Members) != tt.wantCount {
				t.Fatalf("%d members, want %d", len(got.Members), tt.wantCount)
			}
		})
	}
}

// A hung node costs the fan-out its timeout, not the answer: the others'
// members come back, the hung one counted.
func TestPresenceRoomPartial(t *testing.T) {
	ctx := context.Background()
	reg := memory.New(time.Minute, time.Minute)
	for _, id := range []string{"ok", "hung"} {
		if _, err := reg.RenewNode(ctx, &pb.NodeInfo{Id: id, RoomCount: map[string]int32{"live://1": 1}}); err != nil {
			t.Fatal(err)
		}
	}
	a := presenceServer(t, reg, map[string]map[string][]*pb.PresenceMember{"ok": {"live://1": {{Mid: 4, Key: "k4"}}}}, map[string]bool{"hung": true})
	start := time.Now()
	r := a.do(http.MethodGet, "/im/presence/room?type=live&room=1", "", "", presenceAuth)
	if d := time.Since(start); d > presenceTimeout+time.Second {
		t.Fatalf("answer took %s, want about the %s timeout", d, presenceTimeout)
	}
	var got presenceReply
	if err := json.Unmarshal(r.Data, &got); err != nil || r.status != 200 {
		t.Fatalf("status %d, %v", r.status, err)
	}
	if got.Nodes != 2 || got.NodesFailed != 1 || !slices.Equal(got.Members, []presenceMember{{4, "k4"}}) {
		t.Fatalf("reply %+v, want k4 from 2 nodes, 1 failed", got)
	}
}

// downNodes is a registry whose node list is unreachable.
type downNodes struct{ pipeline.Registry }

func (downNodes) Nodes(context.Context) ([]*pb.NodeInfo, error) {
	return nil, errors.New("connection refused")
}

func TestOnlineMids(t *testing.T) {
	ctx := context.Background()
	reg := memory.New(time.Minute, time.Minute)
	if _, err := reg.RenewNode(ctx, &pb.NodeInfo{Id: "n1"}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		mid         int64
		key, server string
	}{{1, "k1", "n1"}, {3, "k3", "n1"}, {5, "k5", "gone-node"}} {
		if _, _, err := reg.AddSession(ctx, s.mid, s.key, s.server, 0); err != nil {
			t.Fatal(err)
		}
	}
	a := presenceServer(t, reg, nil, nil)
	down := presenceServer(t, downNodes{reg}, nil, nil)
	many := make([]string, MaxOnlineMids+1)
	for i := range many {
		many[i] = fmt.Sprint(i + 1)
	}
	tests := []struct {
		name          string
		srv           *apiServer
		query         string
		status        int
		online, offln []int64
		wantErr       string
	}{
		{name: "comma-separated", query: "?mids=1,2,3", status: 200, online: []int64{1, 3}, offln: []int64{2}},
		{name: "repeated, deduplicated", query: "?mids=3&mids=1,3&mids=4", status: 200, online: []int64{1, 3}, offln: []int64{4}},
		{name: "a lapsed node's user is offline", query: "?mids=5", status: 200, online: []int64{}, offln: []int64{5}},
		{name: "exactly the cap", query: "?mids=" + strings.Join(many[:MaxOnlineMids], ","), status: 200},
		{name: "over the cap", query: "?mids=" + strings.Join(many, ","), status: 400, wantErr: "more than 1000"},
		{name: "no mids", query: "", status: 400, wantErr: "mids: required"},
		{name: "empty mids", query: "?mids=", status: 400, wantErr: "mids"},
		{name: "not a number", query: "?mids=1,x", status: 400, wantErr: "mids"},
		{name: "zero", query: "?mids=0", status: 400, wantErr: "mids"},
		{name: "negative", query: "?mids=-4", status: 400, wantErr: "mids"},
		{name: "overflow", query: "?mids=99999999999999999999", status: 400, wantErr: "mids"},
		{name: "registry down is 503", srv: down, query: "?mids=1", status: 503, wantErr: "registry unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := tt.srv
			if srv == nil {
				srv = a
			}
			r := srv.do(http.MethodGet, "/im/online/mids"+tt.query, "", "", presenceAuth)
			if r.status != tt.status {
				t.Fatalf("status %d (%s), want %d", r.status, deref(r.Msg), tt.status)
			}
			if tt.status != 200 {
				if r.Code != -tt.status || !strings.Contains(deref(r.Msg), tt.wantErr) {
					t.Fatalf("reply %d %q, want code %d naming %q", r.Code, deref(r.Msg), -tt.status, tt.wantErr)
				}
				return
			}
			var got onlineReply
			if err := json.Unmarshal(r.Data, &got); err != nil {
				t.Fatal(err)
			}
			if tt.online != nil && (!slices.Equal(got.Online, tt.online) || !slices.Equal(got.Offline, tt.offln)) {
				t.Fatalf("online %v offline %v, want %v and %v", got.Online, got.Offline, tt.online, tt.offln)
			}
			if tt.online == nil && len(got.Online)+len(got.Offline) != MaxOnlineMids {
				t.Fatalf("answered %d users, want %d", len(got.Online)+len(got.Offline), MaxOnlineMids)
			}
		})
	}
	if r := a.do(http.MethodPost, "/im/online/mids?mids=1", "", "", presenceAuth); r.status != 405 {
		t.Fatalf("POST: status %d, want 405", r.status)
	}
}

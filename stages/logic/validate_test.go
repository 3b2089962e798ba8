package logic

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
	"imcloud/stages/logic/token"
)

// TestInvalidClaimsRefused: a token whose key, rooms or platform the wire
// does not accept is refused (the client gets 4401), in both modes, before
// any string reaches the registry.
func TestInvalidClaimsRefused(t *testing.T) {
	exp := time.Hour
	tests := []struct {
		name string
		c    token.Claims
	}{
		{"room with NUL", token.Claims{Mid: 1, Rooms: []string{"live://1\x00"}}},
		{"room not type://id", token.Claims{Mid: 1, Rooms: []string{"lobby"}}},
		{"room too long", token.Claims{Mid: 1, Rooms: []string{"live://" + strings.Repeat("x", 200)}}},
		{"pattern with a second star", token.Claims{Mid: 1, Rooms: []string{"live://*/*"}}},
		{"too many rooms", token.Claims{Mid: 1, Rooms: slices.Repeat([]string{"live://1"}, 65)}},
		{"key with space", token.Claims{Mid: 1, Key: "a b"}},
		{"key too long", token.Claims{Mid: 1, Key: strings.Repeat("k", 129)}},
		{"platform with newline", token.Claims{Mid: 1, Platform: "web\nINFO forged"}},
		{"too many accepts", token.Claims{Mid: 1, Accepts: make([]int32, 1025)}},
	}
	jwtAuth, err := token.NewAuthenticator(config.Auth{Mode: "jwt", JWTSecret: "secret"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tok, err := token.Sign("secret", tt.c, exp)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := jwtAuth.Authenticate([]byte(tok)); !errors.Is(err, token.ErrUnauthenticated) {
				t.Fatalf("jwt: err = %v, want token.ErrUnauthenticated", err)
			}
		})
	}
	goim, _ := token.NewAuthenticator(config.Auth{Mode: "insecure-json"})
	for _, body := range []string{`{"mid":1,"room_id":"\u00ff\u0000"}`, `{"mid":1,"room_id":"live://a b"}`, `{"mid":1,"key":"a\u0001"}`} {
		if _, err := goim.Authenticate([]byte(body)); !errors.Is(err, token.ErrUnauthenticated) {
			t.Errorf("insecure-json %s: err = %v, want token.ErrUnauthenticated", body, err)
		}
	}
}

// TestRoomClaimGrants: exact rooms are joined, patterns only granted;
// insecure-json grants any room and operation, as goim did.
func TestRoomClaimGrants(t *testing.T) {
	a, _ := token.NewAuthenticator(config.Auth{Mode: "jwt", JWTSecret: "secret"})
	tok, _ := token.Sign("secret", token.Claims{Mid: 1, Rooms: []string{"public://lobby", "live://*"}, Accepts: []int32{1000}}, time.Hour)
	id, err := a.Authenticate([]byte(tok))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(id.Rooms, []string{"public://lobby"}) || !slices.Equal(id.RoomGrants, []string{"live://*"}) || id.AnyRoom || id.AnyAccept {
		t.Fatalf("jwt identity = %+v", id)
	}
	goim, _ := token.NewAuthenticator(config.Auth{Mode: "insecure-json"})
	id, err = goim.Authenticate([]byte(`{"mid":1,"room_id":"live://1"}`))
	if err != nil {
		t.Fatal(err)
	}
	if !id.AnyRoom || !id.AnyAccept || !slices.Equal(id.Rooms, []string{"live://1"}) {
		t.Fatalf("insecure-json identity = %+v", id)
	}
}

// TestGRPCRefusesInvalidStrings: logic answers InvalidArgument to a cloud
// node that reports a string the wire does not accept, and the registry
// keeps none of it. On main a room "\xff" in RoomCount was stored (memory
// registry) or failed every renewal (Redis).
func TestGRPCRefusesInvalidStrings(t *testing.T) {
	reg := memory.New(time.Minute, time.Minute)
	auth, _ := token.NewAuthenticator(config.Auth{Mode: "insecure-json"})
	s := newGRPCServer(config.Default().Logic, auth, reg, nil, slog.New(slog.DiscardHandler))
	ctx := context.Background()
	node := func(edit func(*pb.NodeInfo)) *pb.RenewOnlineReq {
		n := &pb.NodeInfo{Id: "n1", GrpcAddr: "10.0.0.1:3109", Host: "push1", RoomCount: map[string]int32{"live://1": 1}}
		edit(n)
		return &pb.RenewOnlineReq{Node: n}
	}
	calls := map[string]func() error{
		"renew room not UTF-8": func() error {
			_, err := s.RenewOnline(ctx, node(func(n *pb.NodeInfo) { n.RoomCount["\xff"] = 1 }))
			return err
		},
		"renew room with NUL": func() error {
			_, err := s.RenewOnline(ctx, node(func(n *pb.NodeInfo) { n.RoomCount["live://a\x00"] = 1 }))
			return err
		},
		"renew room too long": func() error {
			_, err := s.RenewOnline(ctx, node(func(n *pb.NodeInfo) { n.RoomCount["live://"+strings.Repeat("x", 200)] = 1 }))
			return err
		},
		"renew id with control": func() error {
			_, err := s.RenewOnline(ctx, node(func(n *pb.NodeInfo) { n.Id = "n\x1b[31m" }))
			return err
		},
		"renew host too long": func() error {
			_, err := s.RenewOnline(ctx, node(func(n *pb.NodeInfo) { n.Host = strings.Repeat("h", 300) }))
			return err
		},
		"connect server not UTF-8": func() error {
			_, err := s.Connect(ctx, &pb.ConnectReq{Server: "\xff", Token: []byte(`{"mid":1}`)})
			return err
		},
		"connect remote with newline": func() error {
			_, err := s.Connect(ctx, &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4\n", Token: []byte(`{"mid":1}`)})
			return err
		},
		"heartbeat key not UTF-8": func() error {
			_, err := s.Heartbeat(ctx, &pb.HeartbeatReq{Mid: 1, Key: "\xff", Server: "n1"})
			return err
		},
		"heartbeat without server": func() error {
			_, err := s.Heartbeat(ctx, &pb.HeartbeatReq{Mid: 1, Key: "k"})
			return err
		},
		"disconnect key with NUL": func() error {
			_, err := s.Disconnect(ctx, &pb.DisconnectReq{Mid: 1, Key: "k\x00", Server: "n1"})
			return err
		},
	}
	for name, call := range calls {
		if code := status.Code(call()); code != codes.InvalidArgument {
			t.Errorf("%s: code %v, want InvalidArgument", name, code)
		}
	}
	nodes, err := reg.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes) != 0 {
		t.Fatalf("registry holds %d nodes, want none", len(nodes))
	}
	// A valid report still works, and Connect tells cloud the grants
	// and the session TTL.
	if _, err := s.RenewOnline(ctx, node(func(*pb.NodeInfo) {})); err != nil {
		t.Fatal(err)
	}
	reply, err := s.Connect(ctx, &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Token: []byte(`{"mid":1,"key":"k","room_id":"live://1"}`)})
	if err != nil {
		t.Fatal(err)
	}
	if !reply.AnyRoom || !reply.AnyAccept || reply.SessionTtl != 600 {
		t.Fatalf("connect reply %v", reply)
	}
	if _, err := s.Heartbeat(ctx, &pb.HeartbeatReq{Mid: 1, Key: "k", Server: "n1"}); err != nil {
		t.Fatal(err)
	}
}

// TestReadBody: a body is read whole up to its limit whatever length it
// declares; one that declares more than it sends is an error, not a
// short message; past the limit it is *http.MaxBytesError.
func TestReadBody(t *testing.T) {
	const limit = 8
	for _, tc := range []struct {
		name     string
		body     string
		declared int64 // -1: unknown (chunked)
		want     string
		tooLarge bool
		fails    bool
	}{
		{"declared", "hello", 5, "hello", false, false},
		{"chunked", "hello", -1, "hello", false, false},
		{"empty", "", 0, "", false, false},
		{"at the limit", "12345678", 8, "12345678", false, false},
		{"declared past the limit", "123456789", 9, "", true, false},
		{"chunked past the limit", "123456789", -1, "", true, false},
		{"declares more than it sends", "abc", 6, "", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &http.Request{Body: io.NopCloser(strings.NewReader(tc.body)), ContentLength: tc.declared}
			got, err := readBody(r, limit)
			var tooBig *http.MaxBytesError
			switch {
			case tc.tooLarge:
				if !errors.As(err, &tooBig) {
					t.Fatalf("readBody: %q, %v; want a MaxBytesError", got, err)
				}
			case tc.fails:
				if err == nil {
					t.Fatalf("readBody: %q; want an error", got)
				}
			case err != nil || string(got) != tc.want:
				t.Fatalf("readBody: %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

package logic

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
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

// TestRejectedAuthLogsOnce: bad tokens are each refused, and a flood of
// them writes one log line per interval, not one each (3,468 lines/s,
// 13.8 MB in 10 s before).
func TestRejectedAuthLogsOnce(t *testing.T) {
	var buf bytes.Buffer
	auth, err := token.NewAuthenticator(config.Auth{Mode: config.AuthJWT, JWTSecret: "secret"})
	if err != nil {
		t.Fatal(err)
	}
	s := newGRPCServer(config.Default().Logic, auth, memory.New(time.Minute, time.Minute), nil, slog.New(slog.NewTextHandler(&buf, nil)))
	const attempts = 1000
	for i := range attempts {
		_, err := s.Connect(context.Background(), &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Token: fmt.Appendf(nil, "bad.token.%d", i)})
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("attempt %d: %v, want Unauthenticated", i, err)
		}
	}
	if n := strings.Count(buf.String(), "client auth rejected"); n != 1 {
		t.Fatalf("%d bad tokens wrote %d log lines, want 1:\n%s", attempts, n, buf.String())
	}
}

// connectServer is a logic gRPC server trusting insecure-json bodies.
func connectServer(t *testing.T, edit func(*config.Logic)) *grpcServer {
	t.Helper()
	cfg := config.Default().Logic
	edit(&cfg)
	auth, err := token.NewAuthenticator(config.Auth{Mode: config.AuthInsecureJSON})
	if err != nil {
		t.Fatal(err)
	}
	return newGRPCServer(cfg, auth, memory.New(time.Minute, time.Minute), &replacer{}, slog.New(slog.DiscardHandler))
}

func connectAs(s *grpcServer, mid int64, key string, conn uint64) error {
	_, err := s.Connect(context.Background(), &pb.ConnectReq{Server: "n1", RemoteAddr: "1.2.3.4:5", Conn: conn,
		Token: fmt.Appendf(nil, `{"mid":%d,"key":%q}`, mid, key)})
	return err
}

// TestConnectRatePerUser: a user reconnecting in a loop is refused with
// ResourceExhausted (cloud closes 4029) past logic.connect_burst, and
// other users are not; before, every reconnect was a registry write.
func TestConnectRatePerUser(t *testing.T) {
	// A rate this low refills no token while the test runs.
	s := connectServer(t, func(c *config.Logic) { c.ConnectRate, c.ConnectBurst = 0.001, 5 })
	for i := range 5 {
		if err := connectAs(s, 1, "k1", uint64(i+1)); err != nil {
			t.Fatalf("connect %d within the burst: %v", i, err)
		}
	}
	// The limit is per user, whichever key it connects with.
	if err := connectAs(s, 1, "k2", 9); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("connect past the burst: %v, want ResourceExhausted", err)
	}
	if err := connectAs(s, 2, "other", 10); err != nil {
		t.Fatalf("another user was refused: %v", err)
	}
	off := connectServer(t, func(c *config.Logic) { c.ConnectRate = 0 })
	for i := range 50 {
		if err := connectAs(off, 1, "k1", uint64(i+1)); err != nil {
			t.Fatalf("connect_rate 0 refused connect %d: %v", i, err)
		}
	}
}

// TestConnectLimiterGuestsApart: guests of mid 0 (insecure-json) share
// the mid but not a limiter: each key has its own.
func TestConnectLimiterGuestsApart(t *testing.T) {
	l := newConnectLimiter(0.001, 2)
	for range 2 {
		if !l.allow(token.Identity{Mid: 0, Key: "guest-a"}) {
			t.Fatal("guest a refused within its burst")
		}
	}
	if l.allow(token.Identity{Mid: 0, Key: "guest-a"}) {
		t.Fatal("guest a allowed past its burst")
	}
	if !l.allow(token.Identity{Mid: 0, Key: "guest-b"}) {
		t.Fatal("guest b refused because guest a used up its connects")
	}
	// Guests naming no key get one made up each time: nothing to limit
	// them by, and no entry of the limiter's for each.
	before := l.users.Len()
	for range 100 {
		id, err := mustAuth(t, config.Auth{Mode: config.AuthInsecureJSON}).Authenticate([]byte(`{"mid":0}`))
		if err != nil {
			t.Fatal(err)
		}
		if !l.allow(id) {
			t.Fatal("a guest without a key refused")
		}
	}
	if n := l.users.Len(); n != before {
		t.Fatalf("100 guests without keys left %d limiter entries, want none", n-before)
	}
}

// TestMaxSessionsPerMid: a user at logic.max_sessions_per_mid is refused
// a new key, may reconnect a key it has, and may add one when a session
// ends.
func TestMaxSessionsPerMid(t *testing.T) {
	s := connectServer(t, func(c *config.Logic) { c.MaxSessionsPerMid = 2 })
	steps := []struct {
		name string
		do   func() error
		want codes.Code
	}{
		{"first key", func() error { return connectAs(s, 1, "k1", 1) }, codes.OK},
		{"second key", func() error { return connectAs(s, 1, "k2", 2) }, codes.OK},
		{"third key over the cap", func() error { return connectAs(s, 1, "k3", 3) }, codes.ResourceExhausted},
		{"another user", func() error { return connectAs(s, 2, "k9", 4) }, codes.OK},
		{"reconnect of a key held", func() error { return connectAs(s, 1, "k1", 5) }, codes.OK},
		{"k2 leaves", func() error {
			_, err := s.Disconnect(context.Background(), &pb.DisconnectReq{Mid: 1, Key: "k2", Server: "n1", Conn: 2})
			return err
		}, codes.OK},
		{"third key after one left", func() error { return connectAs(s, 1, "k3", 6) }, codes.OK},
	}
	for _, st := range steps {
		if got := status.Code(st.do()); got != st.want {
			t.Fatalf("%s: %v, want %v", st.name, got, st.want)
		}
	}
}

// TestDisconnectOfReplacedConnection: logic passes each call's connection
// id to the registry, so the late Disconnect and Heartbeat of a key's
// replaced connection leave the new connection's session registered.
func TestDisconnectOfReplacedConnection(t *testing.T) {
	s := connectServer(t, func(*config.Logic) {})
	ctx := context.Background()
	if err := connectAs(s, 1, "racekey", 1); err != nil {
		t.Fatal(err)
	}
	if err := connectAs(s, 1, "racekey", 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Heartbeat(ctx, &pb.HeartbeatReq{Mid: 1, Key: "racekey", Server: "n1", Conn: 1}); err != nil {
		t.Fatal(err)
	}
	reply, err := s.Disconnect(ctx, &pb.DisconnectReq{Mid: 1, Key: "racekey", Server: "n1", Conn: 1})
	if err != nil {
		t.Fatal(err)
	}
	if reply.Has {
		t.Fatal("the replaced connection's Disconnect deleted the session")
	}
	servers, err := s.registry.ServersByKeys(ctx, []string{"racekey"})
	if err != nil {
		t.Fatal(err)
	}
	if servers["racekey"] != "n1" {
		t.Fatalf("racekey offline while its second connection is up: %v", servers)
	}
	if reply, err := s.Disconnect(ctx, &pb.DisconnectReq{Mid: 1, Key: "racekey", Server: "n1", Conn: 2}); err != nil || !reply.Has {
		t.Fatalf("the live connection's Disconnect: %v, %v", reply, err)
	}
}

func mustAuth(t *testing.T, cfg config.Auth) token.Authenticator {
	t.Helper()
	a, err := token.NewAuthenticator(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

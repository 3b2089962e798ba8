package job

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/pipeline/clusterauth"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

const clusterSecret = "0123456789abcdef-cluster"

// answeringCloud answers every Broadcast with err.
type answeringCloud struct {
	pb.UnimplementedCloudServer
	err error
}

func (a answeringCloud) Broadcast(context.Context, *pb.BroadcastReq) (*pb.BroadcastReply, error) {
	return &pb.BroadcastReply{}, a.err
}

func (a answeringCloud) Ping(context.Context, *pb.PingReq) (*pb.PingReply, error) {
	return &pb.PingReply{NodeId: "c"}, nil
}

// startCloud serves srv behind the cluster options of a cluster with
// clusterSecret.
func startCloud(t *testing.T, srv pb.CloudServer) string {
	t.Helper()
	opts, err := clusterauth.ServerOptions(config.Cluster{Secret: clusterSecret}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(opts...)
	pb.RegisterCloudServer(g, srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(ln) }()
	t.Cleanup(g.Stop)
	return ln.Addr().String()
}

func newStage(t *testing.T, secret string, addrs ...string) *Stage {
	t.Helper()
	dial, err := clusterauth.DialOptions(config.Cluster{Secret: secret})
	if err != nil {
		t.Fatal(err)
	}
	s := New(Options{Nodes: StaticNodes(addrs), Logger: slog.New(slog.DiscardHandler), Timeout: 5 * time.Second, CloudDial: dial})
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// TestCloudRefusalIsAConfigFault: on main a job without the cluster secret
// returned the cloud's Unauthenticated as a delivery failure, which the
// pipeline retried and poisoned, for every message. A refusal of the
// caller (Unauthenticated, PermissionDenied), even from one node of
// several, is a pipeline.ConfigError naming cluster.secret, which the
// pipeline holds; other failures stay delivery failures.
func TestCloudRefusalIsAConfigFault(t *testing.T) {
	ok := startCloud(t, answeringCloud{})
	denied := startCloud(t, answeringCloud{err: status.Error(codes.PermissionDenied, "not you")})
	down := startCloud(t, answeringCloud{err: status.Error(codes.Unavailable, "draining")})
	tests := []struct {
		name       string
		secret     string
		nodes      []string
		wantErr    bool
		wantConfig bool
	}{
		{"right secret", clusterSecret, []string{ok}, false, false},
		{"no secret", "", []string{ok}, true, true},
		{"wrong secret", "0123456789abcdef-wrong!!", []string{ok}, true, true},
		{"permission denied", clusterSecret, []string{denied}, true, true},
		{"one node refuses, one is down", clusterSecret, []string{denied, down}, true, true},
		{"node down", clusterSecret, []string{down}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStage(t, tt.secret, tt.nodes...)
			msg, err := pipeline.NewPushMessage("m1", "c", &pb.PushMsg{Type: pb.PushMsg_BROADCAST, Operation: 1000, Msg: []byte("hi")})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			msg.SetContext(ctx)
			err = s.Handle(msg)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Handle: %v, want error %v", err, tt.wantErr)
			}
			var ce *pipeline.ConfigError
			if got := errors.As(err, &ce); got != tt.wantConfig {
				t.Fatalf("Handle: %v; a ConfigError: %v, want %v", err, got, tt.wantConfig)
			}
			if ce != nil && ce.Key != "cluster.secret" {
				t.Fatalf("ConfigError names %q, want cluster.secret", ce.Key)
			}
		})
	}
}

// TestCheckCloudsRefusesWithoutTheSecret: job pings the cloud nodes it
// knows at start-up; a refusal stops it, an unreachable node does not.
func TestCheckCloudsRefusesWithoutTheSecret(t *testing.T) {
	cloud := startCloud(t, answeringCloud{})
	// A port nothing listens on: bound, then closed.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := ln.Addr().String()
	_ = ln.Close()
	tests := []struct {
		name    string
		secret  string
		nodes   []string
		wantErr bool
	}{
		{"right secret", clusterSecret, []string{cloud}, false},
		{"no secret", "", []string{cloud}, true},
		{"wrong secret", "0123456789abcdef-wrong!!", []string{cloud}, true},
		{"wrong secret, another node unreachable", "0123456789abcdef-wrong!!", []string{cloud, gone}, true},
		{"unreachable node", clusterSecret, []string{gone}, false},
		{"no nodes yet", "", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := newStage(t, tt.secret, tt.nodes...).CheckClouds(context.Background())
			if (err != nil) != tt.wantErr {
				t.Fatalf("CheckClouds: %v, want error %v", err, tt.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), "cluster.secret") {
				t.Fatalf("error %q does not name cluster.secret", err)
			}
		})
	}
}

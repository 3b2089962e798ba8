// Package logic is the front door for business backends: the HTTP push API,
// client authentication for cloud nodes, and the session registry. Every
// accepted push is published to the broker as PushMsg envelopes.
package logic

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/grpc"

	"imcloud/cloudconn"
	"imcloud/config"
	"imcloud/proto/pb"
)

// Stage is a configured logic stage, ready to be served.
type Stage struct {
	cfg       config.Logic
	heartbeat time.Duration // the clients' heartbeat period, for /nodes/weighted
	pusher    *Pusher
	replies   ReplyStore
	grpc      *grpcServer
	logger    *slog.Logger
}

// ReplyStore keeps the reply to each request made with an Idempotency-Key,
// so that a retry is answered without publishing again.
type ReplyStore interface {
	Reply(ctx context.Context, key string) ([]byte, bool, error)
	SaveReply(ctx context.Context, key string, reply []byte) error
}

// Options are the logic stage's collaborators.
type Options struct {
	Registry  Registry
	Publisher message.Publisher
	PushTopic string
	Replies   ReplyStore
	// Heartbeat is the period clients are told to heartbeat at.
	Heartbeat time.Duration
	Logger    *slog.Logger
}

// New assembles the logic stage.
func New(cfg config.Logic, o Options) (*Stage, error) {
	auth, err := NewAuthenticator(cfg.Auth)
	if err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	if cfg.Auth.Mode == config.AuthInsecureJSON {
		o.Logger.Warn("logic.auth.mode is insecure-json: client auth bodies are trusted as is, and any client may join any room (op 12) and subscribe any operation (op 14), as in goim; use it only to migrate goim clients or for local demos")
	}
	return &Stage{
		cfg:       cfg,
		heartbeat: o.Heartbeat,
		pusher:    &Pusher{registry: o.Registry, publisher: o.Publisher, topic: o.PushTopic},
		replies:   o.Replies,
		grpc: &grpcServer{auth: auth, registry: o.Registry, logger: o.Logger, sessionTTL: cfg.SessionTTL,
			replacer: &replacer{registry: o.Registry, logger: o.Logger, clouds: cloudconn.New()}},
		logger: o.Logger,
	}, nil
}

// Close releases the stage's connections to cloud nodes.
func (st *Stage) Close() error { return st.grpc.replacer.Close() }

// RegisterGRPC adds the Logic service to s.
func (st *Stage) RegisterGRPC(s *grpc.Server) { pb.RegisterLogicServer(s, st.grpc) }

// Handler returns the HTTP API, answering under /im/ and /goim/.
func (st *Stage) Handler() http.Handler {
	mux := http.NewServeMux()
	routes := map[string]pushRoute{
		"push/keys": st.pushKeys,
		"push/mids": st.pushMids,
		"push/room": st.pushRoom,
		"push/all":  st.pushAll,
	}
	stats := map[string]statsRoute{
		"online/top":     onlineTop,
		"online/room":    onlineRoom,
		"online/total":   onlineTotal,
		"nodes/weighted": st.nodesWeighted,
	}
	for _, prefix := range []string{"/im/", "/goim/"} {
		for path, route := range routes {
			mux.Handle("POST "+prefix+path, st.push(path, route))
		}
		for path, route := range stats {
			mux.Handle("GET "+prefix+path, st.stats(route))
		}
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such route: "+r.Method+" "+r.URL.Path)
	})
	return mux
}

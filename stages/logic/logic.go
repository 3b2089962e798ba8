// Package logic is the front door for business backends: the HTTP push API,
// client authentication for cloud nodes, and the session registry. Every
// accepted push is published to the broker as PushMsg envelopes.
package logic

import (
	"fmt"
	"log/slog"
	"net/http"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/grpc"

	"imcloud/config"
	"imcloud/proto/pb"
)

// Stage is a configured logic stage, ready to be served.
type Stage struct {
	cfg    config.Logic
	pusher *Pusher
	grpc   *grpcServer
	logger *slog.Logger
}

// New assembles the logic stage. Pushes are published to pushTopic.
func New(cfg config.Logic, reg Registry, pub message.Publisher, pushTopic string, logger *slog.Logger) (*Stage, error) {
	auth, err := NewAuthenticator(cfg.Auth)
	if err != nil {
		return nil, fmt.Errorf("logic: %w", err)
	}
	if cfg.Auth.Mode == config.AuthInsecureJSON {
		logger.Warn("logic.auth.mode is insecure-json: client auth bodies are trusted as is; use it only to migrate goim clients or for local demos")
	}
	return &Stage{
		cfg:    cfg,
		pusher: &Pusher{registry: reg, publisher: pub, topic: pushTopic},
		grpc:   &grpcServer{auth: auth, registry: reg, logger: logger},
		logger: logger,
	}, nil
}

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
	for _, prefix := range []string{"/im/", "/goim/"} {
		for path, route := range routes {
			mux.Handle("POST "+prefix+path, st.push(path, route))
		}
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such route: "+r.Method+" "+r.URL.Path)
	})
	return mux
}

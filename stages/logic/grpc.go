package logic

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// grpcServer serves the Logic service cloud nodes call.
type grpcServer struct {
	pb.UnimplementedLogicServer
	auth     token.Authenticator
	registry pipeline.Registry
	replacer *replacer
	logger   *slog.Logger
	// sessionTTL is told to cloud nodes, which forward heartbeats at most
	// a few times per period.
	sessionTTL time.Duration
	// connects and maxSessions refuse a user's connect with
	// ResourceExhausted, which cloud closes with 4029 (back off).
	connects    *connectLimiter
	maxSessions int // a user's keys online at once; 0 = no limit
	// rejected logs refused auths, limited the refused connects: 4
	// clients sending bad tokens made 3,468 attempts/s and 13.8 MB of
	// log in 10 s, a line each.
	rejected, limited *pipeline.RateLog
	// history serves History, Tops and Ack and the tops of a
	// ConnectReply; nil: history is off. historyFail logs its failures,
	// which an outage makes one per call.
	history     pipeline.History
	historyFail *pipeline.RateLog
	// acks: history.user.acks, user streams keep acknowledged positions
	// (only with a history store).
	acks bool
	// limit is what a stream's class keeps ([history]); nil: not known,
	// so a size-0 class cannot be told from a trimmed one.
	limit func(stream string) pipeline.StreamLimit
}

// logEvery is the least time between two lines of a rate-limited log; the
// next line counts what was left out.
const logEvery = 10 * time.Second

func newGRPCServer(cfg config.Logic, auth token.Authenticator, registry pipeline.Registry, replacer *replacer, logger *slog.Logger) *grpcServer {
	return &grpcServer{
		auth: auth, registry: registry, replacer: replacer, logger: logger, sessionTTL: cfg.SessionTTL,
		connects:    newConnectLimiter(cfg.ConnectRate, cfg.ConnectBurst),
		maxSessions: cfg.MaxSessionsPerMid,
		rejected:    pipeline.NewRateLog(logger, slog.LevelInfo, logEvery),
		limited:     pipeline.NewRateLog(logger, slog.LevelInfo, logEvery),
		historyFail: pipeline.NewRateLog(logger, slog.LevelError, logEvery),
	}
}

// invalid answers a request carrying a string the wire does not accept:
// a cloud node must not poison the registry (an invalid room in one
// node's RoomCount once made every RenewOnline of that node fail).
func invalid(what string, err error) error {
	return status.Errorf(codes.InvalidArgument, "%s: %v", what, err)
}

// validSession checks the identifiers of a session call from a cloud node.
func validSession(key, server string) error {
	if err := wire.ValidKey(key); err != nil {
		return invalid("key", err)
	}
	if err := validServer(server); err != nil {
		return err
	}
	return nil
}

func validServer(server string) error {
	if server == "" {
		return status.Error(codes.InvalidArgument, "server is required")
	}
	if err := wire.ValidText(server, wire.MaxTextLen); err != nil {
		return invalid("server", err)
	}
	return nil
}

// validNode checks every string a cloud node reports about itself.
func validNode(n *pb.NodeInfo) error {
	if n.GetId() == "" || n.GetGrpcAddr() == "" {
		return status.Error(codes.InvalidArgument, "node id and grpc_addr are required")
	}
	for what, v := range map[string]string{"node id": n.Id, "grpc_addr": n.GrpcAddr, "host": n.Host} {
		if err := wire.ValidText(v, wire.MaxTextLen); err != nil {
			return invalid(what, err)
		}
	}
	// Rooms are checked for what the registry, logs and protobuf need,
	// not for the type://id form clients are held to now: a cloud node of
	// an older version may still host such a room, and refusing its whole
	// report would drop the node.
	for room := range n.RoomCount {
		if room == "" {
			return status.Error(codes.InvalidArgument, "room_count: empty room")
		}
		if err := wire.ValidText(room, wire.MaxRoomLen); err != nil {
			return invalid("room_count", err)
		}
	}
	return nil
}

func (s *grpcServer) Connect(ctx context.Context, req *pb.ConnectReq) (*pb.ConnectReply, error) {
	if err := validServer(req.Server); err != nil {
		return nil, err
	}
	if err := wire.ValidText(req.RemoteAddr, wire.MaxTextLen); err != nil {
		return nil, invalid("remote_addr", err)
	}
	id, err := s.auth.Authenticate(req.Token)
	if err != nil {
		s.rejected.Log("client auth rejected", "server", req.Server, "remote", req.RemoteAddr, "err", err)
		if errors.Is(err, token.ErrUnauthenticated) {
			return nil, status.Error(codes.Unauthenticated, "invalid token")
		}
		return nil, status.Error(codes.Internal, "authenticate")
	}
	if err := s.admit(ctx, id); err != nil {
		s.limited.Log("client connect refused", "mid", id.Mid, "key", id.Key, "server", req.Server, "remote", req.RemoteAddr, "err", err)
		return nil, err
	}
	prev, prevConn, err := s.registry.AddSession(ctx, id.Mid, id.Key, req.Server, req.Conn)
	if err != nil {
		s.logger.ErrorContext(ctx, "add session", "mid", id.Mid, "key", id.Key, "err", err)
		return nil, status.Error(codes.Unavailable, "registry unavailable")
	}
	// The registry returns a previous server only when it is another
	// node: a connection replaced on this same node is closed by the
	// node itself when the new one takes the key there.
	if prev != "" {
		s.replacer.replaced(id.Key, prev, prevConn)
	}
	reply := &pb.ConnectReply{Mid: id.Mid, Key: id.Key, Rooms: id.Rooms, Accepts: id.Accepts, Platform: id.Platform,
		RoomGrants: id.RoomGrants, AnyRoom: id.AnyRoom, AnyAccept: id.AnyAccept,
		SessionTtl: int64(s.sessionTTL / time.Second), Tops: s.connectTops(ctx, id.Mid, id.Rooms),
		Recover: id.Recover, Acks: s.acksFor(id.Mid)}
	// Only a client that opted in is recovered from its cursor: goim's
	// clients cost no store read.
	if reply.Recover && reply.Acks {
		reply.Acked = s.connectAcked(ctx, id.Mid)
	}
	return reply, nil
}

// admit refuses a connect over the user's connect rate or session cap
// with ResourceExhausted.
func (s *grpcServer) admit(ctx context.Context, id token.Identity) error {
	if !s.connects.allow(id) {
		return status.Error(codes.ResourceExhausted, "too many connects for this user (logic.connect_rate); back off")
	}
	// Guests of mid 0 are many users under one mid: no cap counts them.
	if s.maxSessions <= 0 || id.Mid == 0 {
		return nil
	}
	// A read per connect, bounded by connect_rate; the count is not taken
	// atomically with the add, so connects racing may pass the cap by a
	// few, never by more than connect_burst.
	keys, err := s.registry.KeysByMids(ctx, []int64{id.Mid})
	if err != nil {
		s.logger.ErrorContext(ctx, "count sessions", "mid", id.Mid, "err", err)
		return status.Error(codes.Unavailable, "registry unavailable")
	}
	live := keys[id.Mid]
	if _, again := live[id.Key]; !again && len(live) >= s.maxSessions {
		return status.Errorf(codes.ResourceExhausted, "user has %d sessions, logic.max_sessions_per_mid is %d", len(live), s.maxSessions)
	}
	return nil
}

func (s *grpcServer) Disconnect(ctx context.Context, req *pb.DisconnectReq) (*pb.DisconnectReply, error) {
	if err := validSession(req.Key, req.Server); err != nil {
		return nil, err
	}
	has, err := s.registry.DelSession(ctx, req.Mid, req.Key, req.Server, req.Conn)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "delete session: %v", err)
	}
	return &pb.DisconnectReply{Has: has}, nil
}

func (s *grpcServer) Heartbeat(ctx context.Context, req *pb.HeartbeatReq) (*pb.HeartbeatReply, error) {
	if err := validSession(req.Key, req.Server); err != nil {
		return nil, err
	}
	if err := s.registry.RenewSession(ctx, req.Mid, req.Key, req.Server, req.Conn); err != nil {
		return nil, status.Errorf(codes.Unavailable, "renew session: %v", err)
	}
	return &pb.HeartbeatReply{}, nil
}

func (s *grpcServer) RenewOnline(ctx context.Context, req *pb.RenewOnlineReq) (*pb.RenewOnlineReply, error) {
	if err := validNode(req.Node); err != nil {
		return nil, err
	}
	all, err := s.registry.RenewNode(ctx, req.Node)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "renew node: %v", err)
	}
	return &pb.RenewOnlineReply{AllRoomCount: all}, nil
}

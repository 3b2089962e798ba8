package cloud

import (
	"context"
	"imcloud/pipeline"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// grpcServer is the Cloud service job calls.
type grpcServer struct {
	pb.UnimplementedCloudServer
	s *Stage
}

// packet encodes a push once; every recipient shares the bytes.
func packet(p *pb.Proto) (outItem, error) {
	if p == nil {
		return outItem{}, status.Error(codes.InvalidArgument, "proto is required")
	}
	if p.Op < wire.MinBusinessOp {
		return outItem{}, status.Errorf(codes.InvalidArgument, "operation %d is reserved for the protocol", p.Op)
	}
	return outItem{pkt: wire.Encode(p.Op, 0, p.Body), op: p.Op, push: true}, nil
}

// PushMsg remembers what it delivered per recipient, not per message: a
// key that was not here when a message first came (its client had not
// reconnected after a restart) must get it when job retries, while a key
// that got it must not get it twice — also when job redelivers the whole
// message after a crash. Remembering only the message id answered such a
// retry "duplicate" for every key, and job took the offline ones as
// delivered.
func (g *grpcServer) PushMsg(_ context.Context, req *pb.PushMsgReq) (*pb.PushMsgReply, error) {
	item, err := packet(req.Proto)
	if err != nil {
		return nil, err
	}
	defer g.s.metrics.Queued("user", req.Proto.GetAcceptedUnixNano())
	if len(req.Proto.Positions) > 0 {
		return g.s.order.pushKeys(req, item), nil
	}
	reply := &pb.PushMsgReply{}
	id := req.Proto.GetId() // "": always delivered
	for _, key := range req.Keys {
		if id != "" && !g.s.delivered.AddPairIfAbsent(id, key) {
			reply.Delivered++ // by an earlier call with this id
			continue
		}
		ch := bucketFor(g.s.buckets, key).get(key)
		switch {
		case ch != nil && !ch.accepts(item.op):
			// Connected but not subscribed to the operation: dropped by
			// the client's choice, not offline (job retries offline keys).
		case ch != nil && ch.push(g.s.deliveredItem(item, ch, req.Proto)):
			reply.Delivered++
		default:
			g.s.offline(reply, id, key)
		}
	}
	return reply, nil
}

// offline answers key offline, forgetting it got id: job retries it.
func (s *Stage) offline(reply *pb.PushMsgReply, id, key string) {
	if id != "" {
		s.delivered.RemovePair(id, key)
	}
	reply.Offline = append(reply.Offline, key)
}

// fanout queues items to every member of room on the node.
func (s *Stage) fanout(room string, items []outItem) int {
	s.metrics.Round()
	n := 0
	for _, b := range s.buckets {
		n += b.roomSend(room, items)
	}
	return n
}

// roomHosted reports whether a client of the node is in room.
func (s *Stage) roomHosted(room string) bool {
	for _, b := range s.buckets {
		if b.roomCount(room) > 0 {
			return true
		}
	}
	return false
}

func (g *grpcServer) BroadcastRoom(_ context.Context, req *pb.BroadcastRoomReq) (*pb.BroadcastRoomReply, error) {
	if req.RoomId == "" {
		return nil, status.Error(codes.InvalidArgument, "room_id is required")
	}
	if req.RoomId == pipeline.CanaryRoom {
		g.s.canarySeen(req.GetProto().GetAcceptedUnixNano())
		return &pb.BroadcastRoomReply{}, nil
	}
	protos := req.Batch
	if req.Proto != nil {
		protos = append([]*pb.Proto{req.Proto}, protos...)
	}
	if g.s.metrics != nil {
		// Per message of the batch, and only with metrics on: no closure
		// per call otherwise.
		defer func() {
			for _, p := range protos {
				g.s.metrics.Queued("room", p.GetAcceptedUnixNano())
			}
		}()
	}
	if len(protos) == 0 {
		return nil, status.Error(codes.InvalidArgument, "proto or batch is required")
	}
	items := make([]outItem, 0, len(protos))
	for _, p := range protos {
		item, err := packet(p)
		if err != nil {
			return nil, err
		}
		items = append(items, item)
	}
	if positioned(protos) {
		// The orderer marks them delivered itself (roomPush).
		return &pb.BroadcastRoomReply{Delivered: int32(g.s.order.roomPush(req.RoomId, items, protos))}, nil
	}
	items = g.s.firstDeliveries(items, protos)
	if len(items) == 0 {
		return &pb.BroadcastRoomReply{}, nil
	}
	n := g.s.rounds.send(req.RoomId, items, func(items []outItem) int {
		return g.s.fanout(req.RoomId, items)
	})
	return &pb.BroadcastRoomReply{Delivered: int32(n)}, nil
}

// Broadcast queues to every connection. A paced broadcast (speed > 0)
// runs on after the call returns, since at speed it may outlast any
// caller's deadline; see startPaced.
func (g *grpcServer) Broadcast(_ context.Context, req *pb.BroadcastReq) (*pb.BroadcastReply, error) {
	item, err := packet(req.Proto)
	if err != nil {
		return nil, err
	}
	defer g.s.metrics.Queued("broadcast", req.Proto.GetAcceptedUnixNano())
	if req.Speed > 0 {
		return g.s.startPaced(req.Proto, item, int(req.Speed))
	}
	if !g.s.firstDelivery(req.Proto) {
		return &pb.BroadcastReply{}, nil
	}
	var chs []*channel
	for _, b := range g.s.buckets {
		chs = b.channels(chs)
	}
	n := 0
	for _, ch := range chs {
		if ch.push(item) {
			n++
		}
	}
	return &pb.BroadcastReply{Delivered: int32(n)}, nil
}

func (g *grpcServer) Rooms(context.Context, *pb.RoomsReq) (*pb.RoomsReply, error) {
	rooms, _, _ := g.s.counts()
	return &pb.RoomsReply{Rooms: rooms}, nil
}

func (g *grpcServer) Ping(context.Context, *pb.PingReq) (*pb.PingReply, error) {
	return &pb.PingReply{NodeId: g.s.nodeID}, nil
}

// Close closes connection req.Conn of key req.Key, replaced by a newer
// one on another node. One that has not taken its key yet is closed when
// it does (see bucket.closeConn).
func (g *grpcServer) Close(_ context.Context, req *pb.CloseReq) (*pb.CloseReply, error) {
	// The key may be remembered: its length bounds the memory that takes.
	if err := wire.ValidKey(req.Key); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "key: %v", err)
	}
	ch := bucketFor(g.s.buckets, req.Key).closeConn(req.Key, req.Conn, time.Now())
	if ch == nil {
		return &pb.CloseReply{}, nil
	}
	ch.close(closeReplaced, "replaced by a connection on another node")
	return &pb.CloseReply{Closed: true}, nil
}

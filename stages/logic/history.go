package logic

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// Bounds on what a cloud node may ask of the history in one call: each is
// an input a node (or whoever holds cluster credentials) controls.
const (
	// maxHistoryLimit caps HistoryReq.limit: a node fills one gap or
	// recovers one stream a page at a time, and 1,000 entries of a 4 KB
	// body is a 4 MB reply, under gRPC's default receive limit.
	maxHistoryLimit = 1000
	// maxTopsStreams caps the streams of one Tops call and of a connect's
	// tops: a connection is in at most cloud.max_rooms rooms (16 by
	// default) plus its user stream.
	maxTopsStreams = 1000
	// maxMidDigits is the longest int64 in decimal.
	maxMidDigits = 19
)

// errHistoryOff answers the history RPCs of a logic without a store.
var errHistoryOff = status.Error(codes.FailedPrecondition, "history is off on this logic node (no history store configured): streams have no positions to read")

// validStream checks a stream name: "room:" and a room clients may use,
// or "user:" and a mid in plain decimal digits.
func validStream(stream string) error {
	if room, ok := pipeline.StreamRoom(stream); ok {
		if err := wire.ValidRoom(room); err != nil {
			return fmt.Errorf("stream %.64q: %w", stream, err)
		}
		return nil
	}
	digits, ok := strings.CutPrefix(stream, "user:")
	if !ok {
		return fmt.Errorf("stream %.64q: not room:<room> nor user:<mid>", stream)
	}
	if digits == "" || len(digits) > maxMidDigits {
		return fmt.Errorf("stream %.64q: mid is not 1 to %d digits", stream, maxMidDigits)
	}
	for i := 0; i < len(digits); i++ {
		if digits[i] < '0' || digits[i] > '9' {
			return fmt.Errorf("stream %.64q: mid is not decimal digits", stream)
		}
	}
	if _, ok := pipeline.StreamMid(stream); !ok {
		return fmt.Errorf("stream %.64q: mid out of range", stream)
	}
	return nil
}

// validEpoch checks an epoch as the wire does (wire.ValidEpoch: what a
// client may send in op 21 or 23). Empty only where allowed says.
func validEpoch(epoch string, allowEmpty bool) error {
	if epoch == "" {
		if allowEmpty {
			return nil
		}
		return errors.New("epoch is required")
	}
	return wire.ValidEpoch(epoch)
}

func streamPosPB(p pipeline.StreamPos) *pb.StreamPos {
	return &pb.StreamPos{Stream: p.Stream, Epoch: p.Epoch, Pos: p.Pos}
}

// unrecoverable names why history cannot serve a position (the reasons of
// op 22, proto/wire), false for a store failure. The store says trimmed
// for a stream of a class that keeps no history (size 0): the messages
// after the position were never kept, and the client is told no_history
// rather than trimmed, so it does not look for a bigger history setting
// that would have kept them. The store only errs when messages were
// missed (a position at the top reads nothing, no error), so no_history
// is only said then.
func unrecoverable(err error, limit func(string) pipeline.StreamLimit, stream string) (string, bool) {
	switch {
	case errors.Is(err, pipeline.ErrEpochChanged):
		return wire.ReasonEpoch, true
	case errors.Is(err, pipeline.ErrTrimmed):
		if limit != nil && limit(stream).Size == 0 {
			return wire.ReasonNoHistory, true
		}
		return wire.ReasonTrimmed, true
	case errors.Is(err, pipeline.ErrFuturePosition):
		return wire.ReasonFuture, true
	}
	return "", false
}

// History returns a stream's entries after a position: a node fills a gap
// in what job delivered, or recovers a client. A position history cannot
// serve is answered with the reason in unrecoverable, not an error: the
// caller tells its client or skips the gap.
func (s *grpcServer) History(ctx context.Context, req *pb.HistoryReq) (*pb.HistoryReply, error) {
	if s.history == nil {
		return nil, errHistoryOff
	}
	if err := validStream(req.Stream); err != nil {
		return nil, invalid("stream", err)
	}
	// Epoch "" with after 0 asks for everything the current epoch keeps.
	if err := validEpoch(req.Epoch, req.After == 0); err != nil {
		return nil, invalid("epoch", err)
	}
	limit := int(req.Limit)
	switch {
	case limit < 0:
		return nil, status.Errorf(codes.InvalidArgument, "limit %d is negative", limit)
	case limit == 0 || limit > maxHistoryLimit:
		limit = maxHistoryLimit
	}
	entries, top, err := s.history.Since(ctx, req.Stream, req.Epoch, req.After, limit)
	reply := &pb.HistoryReply{}
	if top.Stream != "" {
		reply.Top = streamPosPB(top)
	}
	if err != nil {
		reason, ok := unrecoverable(err, s.limit, req.Stream)
		if !ok {
			s.historyFail.Log("read stream history", "stream", req.Stream, "err", err)
			return nil, status.Error(codes.Unavailable, "history store unavailable")
		}
		reply.Unrecoverable = reason
		return reply, nil
	}
	reply.Entries = make([]*pb.HistoryEntry, len(entries))
	for i, e := range entries {
		// A void entry goes too, marked: the node passes over its
		// position rather than wait for it again. Keys let it give a
		// key push's entry to those connections only.
		reply.Entries[i] = &pb.HistoryEntry{Pos: e.Pos, Id: e.ID, Op: e.Op, Body: e.Body, AtUnixMs: e.At.UnixMilli(), Keys: e.Keys, Void: e.Void}
	}
	return reply, nil
}

// Tops returns each stream's current position, for a node that starts
// ordering a stream (op 12 into a room it does not host yet).
func (s *grpcServer) Tops(ctx context.Context, req *pb.TopsReq) (*pb.TopsReply, error) {
	if s.history == nil {
		return nil, errHistoryOff
	}
	if len(req.Streams) == 0 {
		return &pb.TopsReply{}, nil
	}
	if len(req.Streams) > maxTopsStreams {
		return nil, status.Errorf(codes.InvalidArgument, "%d streams, at most %d per call", len(req.Streams), maxTopsStreams)
	}
	for _, st := range req.Streams {
		if err := validStream(st); err != nil {
			return nil, invalid("streams", err)
		}
	}
	tops, err := s.history.Tops(ctx, req.Streams)
	if err != nil {
		s.historyFail.Log("read stream tops", "streams", len(req.Streams), "err", err)
		return nil, status.Error(codes.Unavailable, "history store unavailable")
	}
	reply := &pb.TopsReply{Tops: make([]*pb.StreamPos, len(tops))}
	for i, t := range tops {
		reply.Tops[i] = streamPosPB(t)
	}
	return reply, nil
}

// errAcksOff answers an Ack when history.user.acks is off: the node was
// told so at connect (ConnectReply.acks) and should not have asked.
var errAcksOff = status.Error(codes.FailedPrecondition, "acks are off for user streams (history.user.acks): no cursor is kept")

// acksFor says whether mid's user stream keeps acks: history.user.acks,
// with a history store, for a user (mid 0 is every goim guest at once:
// no one's cursor).
func (s *grpcServer) acksFor(mid int64) bool {
	return s.acks && s.history != nil && mid > 0
}

// connectAcked reads a connecting user's acknowledged position for its
// ConnectReply: a connection naming no position of its user stream is
// recovered from there. A fresh stream is given its epoch at position 0,
// so such a connection gets everything kept. A failing store leaves it
// out (logged): the node then starts the user stream at its top, as with
// acks off, and the connect still succeeds.
func (s *grpcServer) connectAcked(ctx context.Context, mid int64) *pb.StreamPos {
	acked, err := s.history.Acked(ctx, pipeline.UserStream(mid))
	if err != nil {
		s.historyFail.Log("read the acknowledged position for a connect; the connection starts at the stream's top", "mid", mid, "err", err)
		return nil
	}
	return streamPosPB(acked)
}

// Ack moves a user's acknowledged position forward (never back;
// cumulative: a position acknowledges every earlier one of its epoch). A
// foreign epoch is FailedPrecondition, a position past the stream's last
// OutOfRange: the node tells its client, who sent a position it was never
// given. With acks off (history.user.acks) every Ack is
// FailedPrecondition: nothing is stored.
func (s *grpcServer) Ack(ctx context.Context, req *pb.AckReq) (*pb.AckReply, error) {
	if s.history == nil {
		return nil, errHistoryOff
	}
	if !s.acks {
		return nil, errAcksOff
	}
	// Mid 0 is every guest at once: no one's cursor.
	if req.Mid <= 0 {
		return nil, status.Errorf(codes.InvalidArgument, "mid %d: acks need a user (mid > 0)", req.Mid)
	}
	if err := validEpoch(req.Epoch, false); err != nil {
		return nil, invalid("epoch", err)
	}
	if req.Pos == 0 {
		return nil, status.Error(codes.InvalidArgument, "pos 0 acknowledges nothing")
	}
	stream := pipeline.UserStream(req.Mid)
	err := s.history.Ack(ctx, stream, req.Epoch, req.Pos)
	switch {
	case err == nil:
		return &pb.AckReply{}, nil
	case errors.Is(err, pipeline.ErrEpochChanged):
		return nil, status.Errorf(codes.FailedPrecondition, "epoch %s is not the stream's: its history was lost since; resync", req.Epoch)
	case errors.Is(err, pipeline.ErrFuturePosition):
		return nil, status.Errorf(codes.OutOfRange, "position %d is past the last of %s", req.Pos, stream)
	default:
		s.historyFail.Log("ack user stream", "stream", stream, "err", err)
		return nil, status.Error(codes.Unavailable, "history store unavailable")
	}
}

// connectTops reads the tops of a connecting client's user stream and
// rooms for its ConnectReply. A failing store leaves them out: the node
// then asks Tops when a positioned message comes, and the connect still
// succeeds.
func (s *grpcServer) connectTops(ctx context.Context, mid int64, rooms []string) []*pb.StreamPos {
	if s.history == nil {
		return nil
	}
	streams := make([]string, 0, 1+len(rooms))
	streams = append(streams, pipeline.UserStream(mid))
	for _, r := range rooms {
		if wire.ValidRoom(r) == nil && len(streams) < maxTopsStreams {
			streams = append(streams, pipeline.RoomStream(r))
		}
	}
	tops, err := s.history.Tops(ctx, streams)
	if err != nil {
		s.historyFail.Log("read stream tops for a connect; the node asks again when it needs them", "mid", mid, "err", err)
		return nil
	}
	out := make([]*pb.StreamPos, len(tops))
	for i, t := range tops {
		out[i] = streamPosPB(t)
	}
	return out
}

'use strict';
// Reference server for the side-by-side benchmark, built the usual way with Socket.IO v4:
// clients emit "message" with the envelope object; the server emits "message" back with the
// reply/event objects. `join` (a Socket.IO room per room_id), `chat` (direct reply to the sender
// + one event to every other member via `socket.to(room).emit`, which the adapter encodes once
// for all recipients) and `ping`; no auth (the `token` query parameter is ignored), no storage.
//
// Usage: node server.js [PORT]   (listens on 127.0.0.1, path /socket.io/, websocket transport only)

const http = require('http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] || 9300);

/** room_id -> seq counter */
const seqs = new Map();

const server = http.createServer((req, res) => {
  res.writeHead(404);
  res.end();
});
const io = new Server(server, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
});

function error(socket, code, msg, errorCode, message) {
  socket.emit('message', {
    status: 'error',
    code,
    ref: msg.ref,
    room_id: msg.room_id,
    data: { error_code: errorCode, message },
  });
}

io.on('connection', (socket) => {
  socket.on('message', (msg) => {
    if (msg === null || typeof msg !== 'object' || typeof msg.code !== 'string') {
      socket.emit('message', {
        status: 'error',
        code: 'error',
        data: { error_code: 'BAD_REQUEST', message: 'no code' },
      });
      return;
    }
    switch (msg.code) {
      case 'join':
        if (typeof msg.room_id !== 'string') {
          error(socket, 'join_response', msg, 'BAD_REQUEST', 'room_id required');
          return;
        }
        if (!seqs.has(msg.room_id)) {
          seqs.set(msg.room_id, 0);
        }
        socket.join(msg.room_id);
        socket.emit('message', {
          status: 'success',
          code: 'join_response',
          room_id: msg.room_id,
          ref: msg.ref,
          data: {},
        });
        break;
      case 'chat': {
        if (typeof msg.room_id !== 'string' || !socket.rooms.has(msg.room_id)) {
          error(socket, 'chat_response', msg, 'NOT_JOINED', 'join the room first');
          return;
        }
        const seq = seqs.get(msg.room_id) + 1;
        seqs.set(msg.room_id, seq);
        const event = {
          status: 'success',
          code: 'chat_response',
          user_id: msg.user_id,
          room_id: msg.room_id,
          data: { seq, message: msg.data && msg.data.message },
        };
        // Every other member of the room; the packet is encoded once by the adapter.
        socket.to(msg.room_id).emit('message', event);
        socket.emit('message', { ...event, ref: msg.ref });
        break;
      }
      case 'ping':
        socket.emit('message', {
          status: 'success',
          code: 'ping_response',
          ref: msg.ref,
          data: { timestamp: new Date().toISOString() },
        });
        break;
      default:
        error(socket, `${msg.code}_response`, msg, 'UNKNOWN_CODE', 'unknown code');
    }
  });
});

server.listen(port, '127.0.0.1', () => {
  console.error(`socketio peer listening on 127.0.0.1:${port}`);
});
